"""ZSCL (Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of
Vision-Language Models", ICCV 2023): full CLIP fine-tuning, distilled towards the initial CLIP on
reference data, with a running-mean weight ensemble.

Per iteration (one batch of the task, one batch of reference images):

    L = CE_ls(s * cos(f(x), g(prompts)), y)                       label smoothing ``ls``
      + image_loss * D_T(z_ref, z_cur) + text_loss * D_T(z_ref^T, z_cur^T)
      + l2 * sum ||theta - theta_start||^2
    z_ref = s * cos(f_0(x_ref), g_0(texts)),  z_cur = s * cos(f(x_ref), g_0(texts))   (R, M)
    D_T(t, u) = T^2 * CE(u / T, softmax(t / T))

f/g are the trained image/text towers, f_0/g_0 the frozen initial CLIP (the backbone), s CLIP's
logit scale (not trained). Every ``avg_freq`` iterations theta_WE <- (n theta_WE + theta)/(n+1),
theta_WE starting at the task's initial weights; the task ends with theta <- theta_WE, which
predicts (logits s * cos(f(x), g(prompts of every seen class))) and starts the next task.

Followed: Thunderbeee/ZSCL ``mtil/src/models/finetune.py`` (whole-model training without
``logit_scale``, AdamW, warm-up + cosine rate, CE over the task's classes, distillation with the
*reference* text embeddings for both student and teacher, the "text" term being the transposed
matrix, L2 to the task's starting weights, ``merge_we``), ``helpers.py``, ``cil/continual_clip/
models.py`` (class-incremental: CE over the current task's classes only) and the README example
(lr 1e-5, ls 0.2, 1000 iterations, avg_freq 100, l2 1, image and text losses weight 1; args.py:
batch 64, wd 0, warm-up 100, beta2 0.999, T 2) for the defaults.

Deviations: ``iterations`` steps are run (the official loop runs ``iterations + 1``); teacher image
embeddings come from retain's frozen-feature cache (the same numbers, one pass per reference
image); reference data is a user folder (``retain.layers.zscl.read_reference``) instead of
ImageNet + Conceptual Captions; ``reference="current"`` (this task's images and the seen class
prompts) is an offline fallback, NOT the paper's setting; ``ce_classes="seen"`` is an option.
Under torchrun a step's task and reference images are split over the ranks and their features
gathered (``backward_share(shard="outputs")``, as the text-side distillation contrasts the
reference images with each other); the text tower and L2 terms, computed whole on every rank,
count 1/W each (``Dist.counted_once``). CLIP has no BatchNorm and no dropout.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..context import Context
from ..datasets.base import Split
from ..errors import ConfigError
from ..layers.zscl import (
    distillation,
    merge_running_mean,
    read_reference,
    warmup_cosine,
    weight_l2,
)
from ..params import Interval
from ..scenarios.base import Task
from ..training import backward_share, image_inputs, load_prefixed, predict_batches
from .base import CLIP, Method, Needs, count, register_method


class ClipPair(nn.Module):
    """The trained CLIP: ``visual`` (timm ViT -> (B, E)) and ``text``
    (retain.backbones.clip.ClipText)."""

    def __init__(self, visual: nn.Module, text: nn.Module):
        super().__init__()
        self.visual, self.text = visual, text


class ClipClassifier(nn.Module):
    """Images -> s * cos(visual(x), head): (B, 3, S, S) -> (B, C)."""

    def __init__(self, visual: nn.Module, head: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.visual, self.head, self.scale = visual, head, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(self.visual(x), dim=-1) @ self.head.T  # (B, C)


@register_method("zscl")
class ZSCL(Method):
    paper = "Zheng et al., ICCV 2023"
    needs = Needs(CLIP)
    constraints = {"iterations": Interval(1, None), "lr": Interval(0, None, "neither"),
                   "batch_size": Interval(1, None), "weight_decay": Interval(0, None),
                   "beta2": Interval(0, 1, "left"), "warmup": Interval(0, None),
                   "label_smoothing": Interval(0, 1, "left"),
                   "temperature": Interval(0, None, "neither"), "image_loss": Interval(0, None),
                   "text_loss": Interval(0, None), "l2": Interval(0, None),
                   "avg_freq": Interval(1, None)}

    def __init__(self, backbone, *, iterations: int = 1000, lr: float = 1e-5, batch_size: int = 64,
                 weight_decay: float = 0.0, beta2: float = 0.999, warmup: int = 100,
                 label_smoothing: float = 0.2, temperature: float = 2.0, image_loss: float = 1.0,
                 text_loss: float = 1.0, l2: float = 1.0, weight_ensemble: bool = True,
                 avg_freq: int = 100, train_text: bool = True,
                 template: str = "a good photo of a {}.",
                 ce_classes: Literal["task", "seen"] = "task",
                 reference: Literal["folder", "current"] = "folder", reference_root: str = ""):
        super().__init__(backbone)
        self.iterations = iterations  # steps per task
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.beta2 = beta2  # AdamW beta2
        self.warmup = warmup  # warm-up steps of the learning rate
        self.label_smoothing = label_smoothing  # label smoothing of the cross-entropy
        self.temperature = temperature
        self.image_loss = image_loss  # weight of the image-side distillation
        self.text_loss = text_loss  # weight of the text-side distillation
        self.l2 = l2  # weight of the L2 pull to the task's starting weights
        self.weight_ensemble = weight_ensemble  # predict with the running mean of the weights
        self.avg_freq = avg_freq  # steps between weight-ensemble updates
        self.train_text = train_text  # False: the official train_mode="image"
        self.template = template  # text prompt of a class name
        self.ce_classes = ce_classes  # "task": the official class-incremental code
        self.reference = reference  # "current": offline fallback, NOT the paper's setting
        self.reference_root = reference_root  # folder with captions.tsv (see read_reference)
        self.net_: ClipPair | None = None
        self.head_: torch.Tensor | None = None  # (C, E) unit text embeddings of the seen classes

    # -- learning -------------------------------------------------------------------------------
    def _learn(self, task: Task, ctx: Context) -> None:
        if getattr(self.backbone, "text", None) is None:
            raise ConfigError(f"zscl needs a CLIP backbone with a text tower (clip_vit_b16), "
                              f"not {self.backbone.name!r}")
        ref_split, ref_texts = self._reference_data(task)  # fails before any training
        if self.net_ is None:
            self.net_ = self._fresh()
        self.net_.to(ctx.device)
        ensemble = self._train(task, ctx, ref_split, ref_texts)
        if ensemble is not None:
            self.net_ = ensemble  # theta <- theta_WE: predicts and starts the next task
        self.net_.eval()
        self.head_ = self._text_head(task.class_names, ctx).cpu()

    def _fresh(self) -> ClipPair:
        return ClipPair(copy.deepcopy(self.backbone.model), copy.deepcopy(self.backbone.text))

    def _reference_data(self, task: Task) -> tuple[Split, list[str]]:
        if self.reference == "current":
            return task.train, self._prompts(task.class_names)
        if not self.reference_root:
            raise ConfigError("zscl: reference='folder' needs reference_root=<folder with "
                              "captions.tsv>; or set reference='current' (not the paper's setting)")
        return read_reference(self.reference_root)

    def _prompts(self, names) -> list[str]:
        return [self.template.format(n) for n in names]

    def _train(self, task: Task, ctx: Context, ref_split: Split, ref_texts: list[str]
               ) -> ClipPair | None:
        """``iterations`` AdamW steps on ``self.net_``; returns the weight ensemble (or None)."""
        net = self.net_
        params = self._trainable(net)
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay,
                                betas=(0.9, self.beta2))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(self.warmup, self.iterations))
        ensemble, n_we = (copy.deepcopy(net), 1) if self.weight_ensemble else (None, 0)
        anchor = [p.detach().clone() for p in net.parameters()] if self.l2 > 0 else None
        classes = list(task.classes if self.ce_classes == "task" else task.seen_classes)
        lookup = torch.full((task.num_seen,), -1, dtype=torch.long)
        lookup[classes] = torch.arange(len(classes))
        tokens = net.text.tokenize(self._prompts(task.class_names[c] for c in classes))  # (C, L)
        ref_img0 = F.normalize(ctx.features(self.backbone, ref_split), dim=-1)  # (N, E) teacher
        ref_txt0 = self._teacher_text(ref_texts, ctx)  # (M, E)
        targets = torch.from_numpy(task.train.targets)
        batches = _batches(len(task.train), self.batch_size, ctx.generator(task.id, 1))
        ref_batches = _batches(len(ref_split), self.batch_size, ctx.generator(task.id, 2))
        net.train()
        for it in range(self.iterations):
            pos, rpos = next(batches), next(ref_batches)
            x = self.backbone.preprocess(task.train, pos)  # (B, 3, S, S)
            rx = self.backbone.preprocess(ref_split, rpos)  # (R, 3, S, S)
            y = lookup[targets[pos]]  # (B,)
            opt.zero_grad(set_to_none=True)
            self._backward(net, (x, y, rx, ref_img0[rpos]), tokens, ref_txt0, anchor, ctx, params)
            opt.step()
            sched.step()
            if ensemble is not None and it % self.avg_freq == 0:
                merge_running_mean(net, ensemble, n_we)
                n_we += 1
        ctx.dist.same_state(net)
        return ensemble

    def _trainable(self, net: ClipPair) -> list[nn.Parameter]:
        """Every weight but CLIP's logit scale (the text tower only if ``train_text``)."""
        net.requires_grad_(True)
        net.text.logit_scale.requires_grad_(False)
        if not self.train_text:
            net.text.requires_grad_(False)
        return [p for p in net.parameters() if p.requires_grad]

    def _loss(self, net: ClipPair, x, y, tokens, rx, ref_img0, ref_txt0, anchor) -> torch.Tensor:
        scale = net.text.logit_scale.exp()  # fixed: never trained
        text = F.normalize(net.text(tokens), dim=-1)  # (C, E)
        img = F.normalize(net.visual(x), dim=-1)  # (B, E)
        loss = F.cross_entropy(scale * img @ text.T, y, label_smoothing=self.label_smoothing)
        if anchor is not None:
            loss = loss + self.l2 * weight_l2(net, anchor)
        if self._distills:
            image_kd, text_kd = self._distillation(scale, net.visual(rx), ref_img0, ref_txt0)
            loss = loss + image_kd + text_kd
        return loss

    @property
    def _distills(self) -> bool:
        return self.image_loss > 0 or self.text_loss > 0

    def _distillation(self, scale, ref, ref_img0, ref_txt0) -> tuple[torch.Tensor, torch.Tensor]:
        """The image- and text-side distillation terms of the student's reference features
        ``ref`` (R, E)."""
        z_cur = scale * F.normalize(ref, dim=-1) @ ref_txt0.T  # (R, M)
        z_ref = scale * ref_img0 @ ref_txt0.T  # (R, M)
        T = self.temperature
        return (self.image_loss * distillation(z_ref, z_cur, T),
                self.text_loss * distillation(z_ref.T, z_cur.T, T))

    def _backward(self, net: ClipPair, step, tokens, ref_txt0, anchor, ctx: Context, params
                  ) -> None:
        """Gradients of one step ``(x, y, rx, ref_img0)`` on every rank, those of one process.
        Several processes: the step's images (task then reference) are split over the ranks,
        their features gathered (``backward_share(shard="outputs")``: the text-side distillation
        contrasts the reference rows), and the text tower and L2, which every rank then computes
        whole, count 1/W each. One process (or fewer images than ranks): the whole step."""
        x, y, rx, ref_img0 = step
        images = torch.cat([x, rx]) if self._distills else x  # (B [+ R], 3, S, S)
        world = ctx.dist.world_size
        if not ctx.dist.active or len(images) < world:
            backward_share(lambda *s: self._loss(net, s[0], s[1], tokens, s[2], s[3], ref_txt0,
                                                 anchor), lambda loss, _: loss, step, y, ctx,
                           params, shard="replicate")
            return

        def loss_fn(feats: torch.Tensor, _) -> torch.Tensor:  # (B [+ R], E) gathered
            scale = net.text.logit_scale.exp()
            text = F.normalize(ctx.dist.counted_once(net.text(tokens)), dim=-1)  # (C, E)
            img = F.normalize(feats[: len(x)], dim=-1)  # (B, E)
            loss = F.cross_entropy(scale * img @ text.T, y.to(img.device),
                                   label_smoothing=self.label_smoothing)
            if anchor is not None:
                loss = loss + self.l2 * ctx.dist.counted_once(weight_l2(net, anchor))
            if self._distills:
                image_kd, text_kd = self._distillation(scale, feats[len(x):],
                                                       ref_img0.to(img.device), ref_txt0)
                loss = loss + image_kd + text_kd
            return loss

        rows = torch.arange(len(images))  # (B [+ R],) one row per image
        backward_share(net.visual, loss_fn, images, rows, ctx, params, shard="outputs")

    @torch.no_grad()
    def _teacher_text(self, texts: list[str], ctx: Context) -> torch.Tensor:
        """(M, E) unit text embeddings of ``texts`` by the frozen initial text tower."""
        text = self.backbone.text.to(ctx.device).eval()
        chunks = [text.encode_text(texts[i : i + ctx.batch_size])
                  for i in range(0, len(texts), ctx.batch_size)]
        return F.normalize(torch.cat(chunks).float(), dim=-1)  # (M, E)

    @torch.no_grad()
    def _text_head(self, names, ctx: Context) -> torch.Tensor:
        text = self.net_.text.to(ctx.device).eval()
        return F.normalize(text.encode_text(self._prompts(names)).float(), dim=-1)  # (C, E)

    # -- prediction and state ----------------------------------------------------------------------
    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        scale = self.net_.text.logit_scale.detach().exp()
        model = ClipClassifier(self.net_.visual, self.head_.to(ctx.device), scale.to(ctx.device))
        return predict_batches(model, image_inputs(self.backbone, split), len(split), ctx)

    def _state(self) -> dict[str, torch.Tensor]:
        state = {f"net.{k}": v for k, v in self.net_.state_dict().items()}
        return state | {"head": self.head_}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.net_ = self._fresh()
        load_prefixed(self.net_, state, "net.")
        self.head_ = state["head"]

    def parameter_counts(self) -> dict[str, int]:
        image, text = count(self.backbone.model), count(self.backbone.text)
        trainable = image + (text - 1 if self.train_text else 0)  # all but the logit scale
        return {"trainable": trainable, "total": image + text}


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled batches of positions in [0, n): a fresh permutation each pass, the last
    batch of a pass possibly smaller (a shuffled DataLoader re-iterated when exhausted)."""
    while True:
        perm = torch.randperm(n, generator=generator).numpy()
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]
