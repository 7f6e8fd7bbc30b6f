"""PromptFusion (Chen et al., "PromptFusion: Decoupling Stability and Plasticity for Continual
Learning", ECCV 2024, arXiv 2303.07223; official HaoranChen/PromptFusion ``model.py``
(``Clip_PF``, ``VisionEncoder``), ``prompt.py``, ``train_pf.py``, ``main.py``,
``config/pf_cifar.json``, ``config/pf_imagenetr.json``).

Two frozen models see every image. The *stabiliser* is the CLIP of the method's backbone: a
shared image prompt (P_c tokens, N(0, 1)) enters after the class token and the mean of its
outputs, not the class token, goes through ln_post and the projection; each task adds
class-specific CoOp context vectors (n_t × M × W, N(0, 0.01²), older ones frozen) that replace
the first M of 2·M "X" placeholders of "X … X <class name>." in the text tower. The *booster*
is a second frozen ViT (``booster``, created at the first task) with a shared input prompt
(P_v tokens, U(−1, 1), L2P-style: after the class token, the mean of the prompt outputs after
the final norm) and a linear head over all seen classes. With z_clip = exp(s)·cos(image, text)
and s CLIP's (frozen) logit scale,

    z = (1 − σ(λ))·z_clip + σ(λ)·z_vit,   L = NLL(w ⊙ log_softmax(z), y)

on the task's data plus the exemplar memory; from the second task on
w = [θ/σ(β) | σ(α)] weights old/new class columns (θ = t/2; α (bs × n_new) persists, β
(bs × n_old) is re-created per task, both start at 1 and are trained, row b of the batch uses
row b); on the first task w = 1. λ starts at 1. AdamW, gradient clipping at 1 (``clip_grad``;
None: no clipping), cosine stepped once per epoch (``schedule_unit="epoch"``, the official;
``"step"``: after every batch).
Exemplars: 5,000 in total, iCaRL herding on the frozen CLIP image features (continuum's
"barycenter" = moving-barycenter herding, ``retain.memory.herding``). A test image costs two
prompted passes; no class text is encoded at prediction (stored when its task ends).

Deviations: (1) each model gets its own preprocessing (the official feeds CLIP-normalised
images to the ImageNet ViT); (2) the booster's prompt tokens get the class token's positional
embedding (official: a resized positional table); (3) the last partial batch is kept
(official ``drop_last``; it uses the first rows of α, β);
(4) old classes' text features are encoded once per task for training, and each task's
once more at the end of its ``learn``, stored (with the state) for every prediction (the same
numbers up to float rounding: frozen contexts, frozen tower); (5) α is re-created (at 1) when
the number of new classes changes.
``booster_head="token"`` (not official; L2P's ``head_type``) feeds the booster's class token to
the head instead. No test runs real weights (none offline).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone, create_backbone
from ..context import Context
from ..datasets.base import Split
from ..errors import ConfigError
from ..layers.heads import IncrementalLinear
from ..layers.inject import frozen_copy
from ..layers.promptfusion import embed_with_context, fuse, prompt_pooling, prompt_texts, reweight
from ..layers.prompts import block_inputs, class_position, insert_tokens, num_prefix_tokens
from ..memory import ExemplarMemory
from ..params import Interval
from ..scenarios.base import Task
from ..training import ScheduleUnit, fit, predict_batches
from .base import CLIP, GROWS, USES_MEMORY, Method, Needs, count, register_method

FROZEN = ("clip.", "text.", "vit.")  # frozen copies: identified by the backbones, not stored


@register_method("promptfusion")
class PromptFusion(Method):
    paper = "Chen et al., ECCV 2024 (arXiv 2303.07223)"
    tags = frozenset({GROWS, USES_MEMORY})
    needs = Needs(CLIP)  # and a ViT booster (params.booster)
    constraints = {"epochs": Interval(0, None), "lr": Interval(0, None, "neither"),
                   "weight_decay": Interval(0, None), "batch_size": Interval(1, None),
                   "context_length": Interval(1, None), "clip_prompt_length": Interval(1, None),
                   "booster_prompt_length": Interval(1, None), "memory_size": Interval(0, None),
                   "clip_grad": Interval(0, None, "neither")}

    def __init__(self, backbone, *, booster: str = "vit_base_patch16_224.augreg_in21k_ft_in1k",
                 epochs: int = 3, lr: float = 0.002, weight_decay: float = 1e-4,
                 batch_size: int = 32, context_length: int = 30, clip_prompt_length: int = 30,
                 booster_prompt_length: int = 30, memory_size: int = 5000,
                 clip_grad: float | None = 1.0,
                 booster_head: Literal["prompt", "token"] = "prompt", booster_weights: str = "",
                 schedule_unit: ScheduleUnit = "epoch"):
        super().__init__(backbone)
        self.booster = booster  # the plastic ViT (timm / retain backbone name)
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.context_length = context_length  # M: CoOp context vectors per class
        self.clip_prompt_length = clip_prompt_length  # prompt tokens of the CLIP image tower
        self.booster_prompt_length = booster_prompt_length  # prompt tokens of the booster ViT
        self.memory_size = memory_size  # exemplars in total
        self.clip_grad = clip_grad  # None: no clipping
        self.schedule_unit = schedule_unit  # cosine per epoch (official) or per batch
        self.booster_head = booster_head  # booster feature: mean of prompt outputs, or class token
        self.booster_weights = booster_weights  # local weights file of the booster ("": default)
        self.booster_: Backbone | None = None  # created at the first task; not stored
        self.net_: _PFNet | None = None
        self.memory_ = ExemplarMemory(memory_size, selection="herding")

    def _build(self, generator: torch.Generator | None = None) -> _PFNet:
        if getattr(self.backbone, "text", None) is None:
            raise ConfigError(f"promptfusion needs a CLIP backbone with a text tower "
                              f"(clip_vit_b16), not {self.backbone.name!r}")
        if self.booster_ is None:
            self.booster_ = create_backbone(self.booster, weights=self.booster_weights or None)
        return _PFNet(frozen_copy(self.backbone.model), frozen_copy(self.backbone.text),
                      frozen_copy(self.booster_.model), self, generator)

    def _learn(self, task: Task, ctx: Context) -> None:
        if self.net_ is None:
            self.net_ = self._build(ctx.generator(0, 0))
        net = self.net_.to(ctx.device)
        n_old = task.num_seen - len(task.new_classes)
        net.add_task(task.id, task.class_names[n_old:task.num_seen], self.batch_size,
                     ctx.generator(task.id, 1))
        train = task.train
        if len(self.memory_):
            train = Split.concat([train, self.memory_.as_split()])
        if self.epochs:
            self._fit(train, task, n_old, ctx)
        net.eval().store_text_features()
        self.memory_.update(task.train, ctx.features(self.backbone, task.train))

    def _inputs(self, split: Split):
        return lambda pos: (self.backbone.preprocess(split, pos),
                            self.booster_.preprocess(split, pos))

    def _fit(self, train: Split, task: Task, n_old: int, ctx: Context) -> None:
        net = self.net_
        with torch.no_grad():
            old = net.text_features(0, n_old)  # (C_old, E), fixed during the task
        model = _Fused(net, old, (n_old, task.num_seen))

        def loss(logits, y):
            logp = F.log_softmax(logits, 1)  # (B, C)
            if task.id > 0:
                logp = reweight(logp, net.alpha, net.beta, net.theta)
            return F.nll_loss(logp, y)

        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=self.lr, weight_decay=self.weight_decay)
        per_epoch = self.schedule_unit == "epoch"
        steps = self.epochs * (1 if per_epoch else math.ceil(len(train) / self.batch_size))
        fit(model, self._inputs(train), torch.from_numpy(train.targets), ctx, epochs=self.epochs,
            batch_size=self.batch_size, generator=ctx.generator(task.id, 2), loss_fn=loss,
            optimizer=opt, scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps),
            schedule_unit=self.schedule_unit, clip_grad=self.clip_grad,
            desc=f"promptfusion task {task.id}")

    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        net = self.net_.to(ctx.device).eval()
        texts = torch.cat(net.stored).to(ctx.device)  # (C, E) stored: nothing is re-encoded
        return predict_batches(_Fused(net, texts, None), self._inputs(split), len(split), ctx)

    def _state(self) -> dict[str, torch.Tensor]:
        net = {f"net.{k}": v for k, v in self.net_.state_dict().items() if not k.startswith(FROZEN)}
        texts = {f"texts.{t}": f for t, f in enumerate(self.net_.stored)}  # (n_t, E) each
        return net | texts | self.memory_.state("memory.")

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.memory_ = ExemplarMemory(self.memory_size, selection="herding")
        self.memory_.load(state, "memory.")
        net = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
        self.net_ = self._build()
        self.net_.restore(net)
        n = sum(k.startswith("texts.") for k in state)
        self.net_.stored = [state[f"texts.{t}"] for t in range(n)]
        self.net_.eval().store_text_features()  # a state without them: encode them once

    def parameter_counts(self) -> dict[str, int]:
        frozen = count(self.backbone.model) + count(self.backbone.text)
        if self.net_ is None:
            return {"trainable": 0, "total": frozen}
        learned = sum(p.numel() for k, p in self.net_.named_parameters()
                      if not k.startswith(FROZEN))
        return {"trainable": learned, "total": frozen + count(self.net_.vit) + learned}


class _PFNet(nn.Module):
    """Frozen CLIP towers and booster ViT, and everything PromptFusion learns."""

    def __init__(self, clip: nn.Module, text: nn.Module, vit: nn.Module, cfg: PromptFusion,
                 generator: torch.Generator | None):
        super().__init__()
        self.clip, self.text, self.vit, self.m = clip, text, vit, cfg.context_length
        self.booster_head = cfg.booster_head
        self.clip_prompt = nn.Parameter(torch.randn(
            1, cfg.clip_prompt_length, clip.embed_dim, generator=generator))  # (1, Pc, Dc)
        self.vit_prompt = nn.Parameter(torch.empty(1, cfg.booster_prompt_length, vit.embed_dim
                                                   ).uniform_(-1, 1, generator=generator))
        self.head = IncrementalLinear(vit.embed_dim)
        self.contexts = nn.ParameterList()  # per task (n_t, M, W)
        self.lam = nn.Parameter(torch.ones(1))
        self.alpha = nn.Parameter(torch.ones(0, 0))
        self.beta = nn.Parameter(torch.ones(0, 0))
        self.theta = 0.0
        self.stored: list[torch.Tensor] = []  # (n_t, E) text features of each ended task
        self.register_buffer("tokens", torch.zeros(0, text.context_length, dtype=torch.long))

    def train(self, mode: bool = True) -> _PFNet:
        super().train(mode)
        for frozen in (self.clip, self.text, self.vit):
            frozen.eval()
        return self

    def add_task(self, t: int, names, batch_size: int, generator: torch.Generator) -> None:
        """New class contexts and head rows; old contexts frozen; α, β, θ for task ``t``."""
        dev = self.tokens.device
        tokens = self.text.tokenize(prompt_texts(names, self.m)).to(dev)  # (n, L)
        if (tokens[:, -1] != 0).any():  # truncated: the name (or more) was cut off
            raise ConfigError(f"promptfusion: {self.m} context vectors leave no room for the "
                              f"class name in {self.text.context_length} text tokens")
        for p in self.contexts:
            p.requires_grad_(False)
        width = self.text.token_embedding.embedding_dim
        ctx = 0.01 * torch.randn(len(names), self.m, width, generator=generator)  # (n, M, W)
        self.contexts.append(nn.Parameter(ctx.to(dev)))
        self.tokens = torch.cat([self.tokens, tokens])  # (C, L)
        self.head.expand(len(self.tokens), generator)
        if self.alpha.shape != (batch_size, len(names)):
            self.alpha = nn.Parameter(torch.ones(batch_size, len(names), device=dev))
        self.beta = nn.Parameter(torch.ones(batch_size, len(self.tokens) - len(names), device=dev))
        self.theta = t / 2

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Rebuild the grown parameters with the shapes in ``state``, then load it."""
        n = sum(k.startswith("contexts.") for k in state)
        self.contexts.extend(nn.Parameter(state[f"contexts.{i}"]).requires_grad_(False)
                             for i in range(n))
        self.tokens = state["tokens"]
        self.head.expand(len(self.tokens))
        self.alpha, self.beta = nn.Parameter(state["alpha"]), nn.Parameter(state["beta"])
        self.load_state_dict(state, strict=False)

    def text_features(self, lo: int, hi: int) -> torch.Tensor:
        """(hi − lo, E) normalised text features of classes lo..hi−1 with their contexts."""
        ctx = torch.cat(list(self.contexts))[lo:hi]  # (n, M, W)
        tokens = self.tokens[lo:hi]  # (n, L)
        emb = embed_with_context(self.text.token_embedding, tokens, ctx)  # (n, L, W)
        return F.normalize(self.text.encode_embedded(emb, tokens.argmax(-1)), dim=-1)

    def store_text_features(self) -> None:
        """Encode, once, the class texts of the tasks not stored yet (their contexts are frozen
        from now on: the next task trains only its own)."""
        lo = sum(len(f) for f in self.stored)
        with torch.no_grad():
            for context in self.contexts[len(self.stored):]:  # (n_t, M, W)
                self.stored.append(self.text_features(lo, lo + len(context)))  # (n_t, E)
                lo += len(context)

    def forward(self, x_clip: torch.Tensor, x_vit: torch.Tensor, texts: torch.Tensor
                ) -> torch.Tensor:
        b = len(x_clip)
        with prompt_pooling(self.clip, self.clip_prompt.expand(b, -1, -1)):
            img = F.normalize(self.clip(x_clip), dim=-1)  # (B, E)
        z_clip = self.text.logit_scale.exp() * img @ texts.T  # (B, C)
        tokens = (self.vit_prompt + class_position(self.vit)).expand(b, -1, -1)  # (B, Pv, D)
        at, n = num_prefix_tokens(self.vit), tokens.shape[1]
        with block_inputs(self.vit, {0: lambda seq: insert_tokens(seq, tokens, at)}):
            seq = self.vit.forward_features(x_vit)  # (B, 1+Pv+N, D)
        feat = seq[:, at:at + n].mean(1) if self.booster_head == "prompt" else seq[:, 0]  # (B, D)
        z_vit = self.head(feat)[:, :len(texts)]  # (B, C)
        return fuse(z_clip, z_vit, self.lam)  # (B, C)


class _Fused(nn.Module):
    """(CLIP images, booster images) -> fused logits over fixed old texts and, in training, the
    current task's texts encoded with their (trained) contexts at every step."""

    def __init__(self, net: _PFNet, texts: torch.Tensor, new: tuple[int, int] | None):
        super().__init__()
        self.net, self.new = net, new
        self.register_buffer("texts", texts, persistent=False)

    def forward(self, x_clip: torch.Tensor, x_vit: torch.Tensor) -> torch.Tensor:
        texts = self.texts
        if self.new is not None:
            texts = torch.cat([texts, self.net.text_features(*self.new)])  # (C, E)
        return self.net(x_clip, x_vit, texts)
