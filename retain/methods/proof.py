"""PROOF (Zhou et al., "Learning without Forgetting for Vision-Language Models", TPAMI 2025;
official zhoudw-zdw/PROOF ``models/proof.py``, ``utils/inc_net.py::Proof_Net``,
``convs/projections.py``, ``exps/cifar.json``).

Both CLIP towers stay frozen, so an image is embedded once (the feature cache) and a class name
once per template (kept in ``net_.texts``). Each task adds a linear projection E->E for images
and one for texts, P_i(x) = Σ_t W^i_t x + b^i_t (older ones frozen), and 3 context prompts (E-d,
older ones frozen); one shared one-head self-attention fusion module runs over, per sample,

    [ĩ; t̃_1..t̃_C; p̃_1..p̃_C; prompts],   ĩ = P_i(f(x)), t̃_c = n(P_t(g(c))), p̃_c = n(P_i(μ_c))

(n = L2 normalisation, μ_c = mean of the normalised CLIP image features of class c's current-task
training images, computed when c arrives) and gives (ĩ', t̃', p̃'). Training, on the task's data
plus the exemplar memory (herding on CLIP features, 2,000 in total), minimises

    L = CE(ĩ'·t̃'ᵀ, y) + ClipLoss(n(ĩ), t̃_y, exp(s)) + CE(ĩ'·p̃'ᵀ, y)

with ĩ normalised, one template, s CLIP's logit scale (trained). Prediction:

    z = ĩ·t̄ᵀ + ĩ'·t̄'ᵀ + ĩ'·p̃'ᵀ,   t̄_c = n(mean over templates of t̃_c)

with ĩ not normalised, as the official ``_eval_cnn`` (the first term is the projected CLIP
matching, not CLIP's own zero-shot logits).

Deviations: (1) the official code averages t̃' and p̃' over the batch before the dot products,
so a sample's logits depend on its batch; here each sample uses its own fused texts and
prototypes (``batch_mean=True`` restores the official behaviour, labelled as batch
information). (2) The official ``freeze_projection_weight_new`` keeps *all* text projections
trainable; the paper freezes old ones: the default here
(``freeze_old_text_projections=False`` reproduces the code). (3) Training images are not
augmented (the official cifar224 train transform equals the test transform), so features come
from the cache.
Under torchrun every rank computes each whole batch (``fit(shard="replicate")``: the CLIP loss
is in-batch and the fusion's dropout draws one mask per batch, so this is the exact choice; the
head on cached features is cheap), gradients averaged; herding runs on the gathered cached
features, so every rank keeps the same memory. No BatchNorm.
The cosine learning rate steps once per epoch (``schedule_unit="epoch"``, as the official
``CosineAnnealingLR(T_max=epochs)``); ``"step"`` decays it after every batch instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..context import Context
from ..datasets.base import Split
from ..errors import ConfigError
from ..layers.proof import (
    FusionAttention,
    SummedProjections,
    clip_contrastive,
    fuse,
    fused_logits,
)
from ..memory import ExemplarMemory
from ..params import Interval
from ..scenarios.base import Task
from ..training import ScheduleUnit, feature_inputs, fit, predict_batches, seeded
from .base import CLIP, GROWS, USES_MEMORY, Method, Needs, count, register_method


@register_method("proof")
class Proof(Method):
    paper = "Zhou et al., TPAMI 2025 (arXiv 2305.19270)"
    tags = frozenset({GROWS, USES_MEMORY})
    needs = Needs(CLIP)
    constraints = {"epochs": Interval(0, None), "lr": Interval(0, None, "neither"),
                   "batch_size": Interval(1, None), "weight_decay": Interval(0, None),
                   "momentum": Interval(0, 1), "prompts_per_task": Interval(1, None),
                   "dropout": Interval(0, 1, "left"), "memory_size": Interval(0, None)}

    def __init__(self, backbone, *, epochs: int = 5, lr: float = 0.001, batch_size: int = 64,
                 weight_decay: float = 0.05, momentum: float = 0.9, prompts_per_task: int = 3,
                 dropout: float = 0.1, templates: tuple[str, ...] = ("a photo of a {}.",),
                 memory_size: int = 2000, memory_per_class: bool = False,
                 freeze_old_text_projections: bool = True, batch_mean: bool = False,
                 schedule_unit: ScheduleUnit = "epoch"):
        super().__init__(backbone)
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.prompts_per_task = prompts_per_task  # context prompts added per task
        self.dropout = dropout  # of the fusion attention (weights and output)
        self.templates = templates  # the first trains; all are averaged at test
        self.memory_size = memory_size  # exemplars in total (per class if memory_per_class)
        self.memory_per_class = memory_per_class
        self.freeze_old_text_projections = freeze_old_text_projections  # (paper) old ones fixed
        self.batch_mean = batch_mean  # official: fused texts/prototypes averaged over the batch
        self.schedule_unit = schedule_unit  # cosine per epoch (official) or per batch
        self.net_: _ProofNet | None = None
        self.memory_ = self._memory()

    @property
    def uses_batch_information(self) -> bool:
        return self.batch_mean

    def _memory(self) -> ExemplarMemory:
        return ExemplarMemory(self.memory_size, per_class=self.memory_per_class)

    def _build(self, generator: torch.Generator | None = None) -> _ProofNet:
        if getattr(self.backbone, "text", None) is None:
            raise ConfigError(f"proof needs a CLIP backbone with a text tower (clip_vit_b16), "
                              f"not {self.backbone.name!r}")
        return _ProofNet(self.backbone.feature_dim, len(self.templates), self.dropout,
                         self.batch_mean, self.backbone.text.logit_scale, generator)

    def _learn(self, task: Task, ctx: Context) -> None:
        if self.net_ is None:
            self.net_ = self._build(ctx.generator(0, 0))
        net, feats = self.net_, ctx.features(self.backbone, task.train).float()  # (N, E)
        net.add_classes(self._encode(task.class_names[len(net.texts):task.num_seen], ctx),
                        _class_means(feats, task.train.targets, task.classes))
        net.add_task(self.prompts_per_task, ctx.generator(task.id, 1),
                     self.freeze_old_text_projections)
        x, y = feats, torch.from_numpy(task.train.targets)
        if len(self.memory_):
            memory = self.memory_.as_split()
            x = torch.cat([x, ctx.features(self.backbone, memory).float()])  # (N + M, E)
            y = torch.cat([y, torch.from_numpy(memory.targets)])
        if self.epochs:
            self._fit(x, y, task, ctx)
        self.memory_.update(task.train, feats)

    def _encode(self, names, ctx: Context) -> torch.Tensor:
        """(n, T, E) raw CLIP text embeddings of ``names`` under every template (no grad)."""
        text = self.backbone.text.to(ctx.device).eval()
        with torch.no_grad():
            embs = [text.encode_text([t.format(n) for n in names]).float().cpu()
                    for t in self.templates]  # T x (n, E)
        return torch.stack(embs, 1)  # (n, T, E)

    def _fit(self, x: torch.Tensor, y: torch.Tensor, task: Task, ctx: Context) -> None:
        """SGD + cosine on PROOF's loss over cached features x (N, E) and labels y (N,)."""
        with seeded(ctx.generator(task.id, 3), ctx.device):  # dropout draws, reproducibly
            fit(_Training(self.net_), lambda pos: (x[pos], y[pos]), y, ctx, epochs=self.epochs,
                lr=self.lr, batch_size=self.batch_size, weight_decay=self.weight_decay,
                momentum=self.momentum, generator=ctx.generator(task.id, 2),
                loss_fn=lambda loss, _: loss, schedule_unit=self.schedule_unit,
                shard="replicate", desc=f"proof task {task.id}")

    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        feats = ctx.features(self.backbone, split).float()  # (N, E)
        return predict_batches(self.net_, feature_inputs(feats), len(split), ctx)

    def _state(self) -> dict[str, torch.Tensor]:
        net = {f"net.{k}": v for k, v in self.net_.state_dict().items()}
        return net | self.memory_.state("memory.")

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.memory_ = self._memory()
        self.memory_.load(state, "memory.")
        net = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
        self.net_ = self._build()
        for _ in range(sum(k.startswith("prompts.") for k in net)):
            self.net_.add_task(self.prompts_per_task, None, self.freeze_old_text_projections)
        self.net_.texts, self.net_.protos = net["texts"], net["protos"]
        self.net_.load_state_dict(net)

    def parameter_counts(self) -> dict[str, int]:
        base = count(self.backbone.model) + count(self.backbone.text)
        learned = 0 if self.net_ is None else count(self.net_)
        return {"trainable": learned, "total": base + learned}


def _class_means(feats: torch.Tensor, targets, classes) -> torch.Tensor:
    """(len(classes), E) means of the normalised features of each class (``cal_prototype``)."""
    f, y = F.normalize(feats, dim=-1), torch.from_numpy(targets)  # (N, E)
    return torch.stack([f[y == c].mean(0) for c in classes])  # (n, E)


class _ProofNet(nn.Module):
    """Projections, context prompts, fusion; buffers: raw class texts (C, T, E), prototypes
    (C, E). ``forward`` gives the test logits, ``loss`` the training loss."""

    def __init__(self, dim: int, num_templates: int, dropout: float, batch_mean: bool,
                 logit_scale: torch.Tensor, generator: torch.Generator | None):
        super().__init__()
        self.dim, self.batch_mean = dim, batch_mean
        self.img_proj, self.text_proj = SummedProjections(dim), SummedProjections(dim)
        self.prompts = nn.ParameterList()
        self.attn = FusionAttention(dim, dropout, generator)
        self.logit_scale = nn.Parameter(logit_scale.detach().clone().float().cpu())  # ()
        self.register_buffer("texts", torch.zeros(0, num_templates, dim))
        self.register_buffer("protos", torch.zeros(0, dim))

    def add_classes(self, texts: torch.Tensor, protos: torch.Tensor) -> None:
        self.texts = torch.cat([self.texts, texts.to(self.texts)])  # (C, T, E)
        self.protos = torch.cat([self.protos, protos.to(self.protos)])  # (C, E)

    def add_task(self, num_prompts: int, generator: torch.Generator | None,
                 freeze_old_text: bool) -> None:
        self.img_proj.add(generator)
        self.text_proj.add(generator, freeze_old=freeze_old_text)
        for p in self.prompts:
            p.requires_grad_(False)
        prompts = torch.randn(num_prompts, self.dim, generator=generator)  # (P, E)
        self.prompts.append(nn.Parameter(prompts.to(self.protos.device)))

    def class_texts(self, ensemble: bool) -> torch.Tensor:
        """(C, E) n(mean_t n(P_t(g_t(c)))) over all templates, or the first only."""
        raw = self.texts if ensemble else self.texts[:, :1]  # (C, T', E)
        return F.normalize(F.normalize(self.text_proj(raw), dim=-1).mean(1), dim=-1)

    def fused(self, img: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        protos = F.normalize(self.img_proj(self.protos), dim=-1)  # (C, E)
        out = fuse(self.attn, img, texts, protos, torch.cat(list(self.prompts)))
        return fused_logits(*out, batch_mean=self.batch_mean)  # (B, C), (B, C)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        img, texts = self.img_proj(feat), self.class_texts(ensemble=True)  # (B, E), (C, E)
        z_text, z_proto = self.fused(img, texts)  # (B, C), (B, C)
        return img @ texts.T + z_text + z_proto  # (B, C)

    def loss(self, feat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        img = F.normalize(self.img_proj(feat), dim=-1)  # (B, E)
        texts = self.class_texts(ensemble=False)  # (C, E)
        z_text, z_proto = self.fused(img, texts)  # (B, C), (B, C)
        clip = clip_contrastive(img, texts[y], self.logit_scale.exp())
        return F.cross_entropy(z_text, y) + clip + F.cross_entropy(z_proto, y)


class _Training(nn.Module):
    """(features, labels) -> PROOF's training loss, for ``retain.training.fit``."""

    def __init__(self, net: _ProofNet):
        super().__init__()
        self.net = net

    def forward(self, feat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net.loss(feat, y)
