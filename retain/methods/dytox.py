"""DyTox (Douillard et al., "DyTox: Transformers for Continual Learning with DYnamic TOken
eXpansion", CVPR 2022, arXiv 2111.11326; official code arthurdouillard/dytox @4da25c1).

A small ViT trained from scratch on raw pixels (backbones ``pixels_rgb`` / ``pixels``): a shared
encoder (patch embedding, learned positions, ``depth`` self-attention blocks = timm's
``VisionTransformer`` without class token or final norm) and one task-attention block (TAB,
``retain.layers.task_attention``) that every task's token queries. Per task: one token, one
classifier LayerNorm → Linear over that task's classes; logits = concat over tasks, trained with
BCE over all seen classes. Task t > 0:

- teacher = frozen copy of the model before expansion; old tokens and old heads are frozen;
- L = (1 − α) BCE + α KD + λ_div BCE_div, α = n_old / n_all ("auto_kd", as WA); KD = τ²·KL(old
  softmax ‖ new softmax over the old classes), ``kl_div(reduction='mean')`` as the code (scale
  1/n_old of a per-sample KL; pitfall 24); the divergence head (LN → Linear to |C_t| + 1) on the
  last token classifies old classes as 0 and new class c as 1 + its index, training only;
- data = task ∪ rehearsal memory; then iCaRL herding on the concatenated task embeddings;
- balanced finetuning on the memory alone, encoder frozen, constant LR, no KD, no divergence.

Followed the official code, with these deliberate differences:
- plain multi-head self-attention in the encoder instead of ConViT's GPSA (the spec allows it);
- a **global** memory of ``memory_size`` images, herding features computed **without**
  augmentation (issue #5 / erratum: the published numbers held up to N_gpu × the budget; compare
  with the erratum's "2k global" rows); each epoch is one pass over the data (no repeated
  augmentation sampler), the finetuning loader is shuffled, and the encoder stays in eval mode
  (no stochastic depth) while it is frozen during finetuning;
- augmentation is RandomCrop(pad 4) + horizontal flip only (no RandAugment / colour jitter);
- LR = ``lr`` × batch / 512 as the code; the default batch 256 is the authors' 2 GPUs × 128.
Under torchrun (``retain.distributed``): each global batch (augmentation and MixUp drawn as
one process) is split over the ranks (``backward_share``, shard "loss": BCE, KD and the
divergence BCE are per-sample means; the teacher runs on each rank's rows), stochastic depth
draws the global batch's masks (``retain.layers.rows``); the new token and heads are rank 0's
(broadcast); herding runs on gathered embeddings, so every rank keeps the same memory. No BatchNorm.
DyTox+ is ``mixup=0.8`` (MixUp with label smoothing 0.1 on soft BCE targets, also in finetuning).
The network, the loss, MixUp and the crop/flip augmentation live in ``retain.layers.dytox``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..context import Context
from ..datasets.base import Split
from ..errors import ConfigError
from ..layers.dytox import (
    DyToxNet,
    TaskEmbeddings,
    build_dytox,
    crop_flip,
    dytox_loss,
    mixup,
    soft_targets,
)
from ..layers.inject import frozen_copy
from ..layers.rows import global_rows, row_ids
from ..memory import ExemplarMemory
from ..params import Interval
from ..scenarios.base import Task
from ..training import backward_share, image_inputs, predict_batches, seeded
from .base import GROWS, NEW_CLASSES, PIXELS, USES_MEMORY, Method, Needs, count, register_method


@register_method("dytox")
class DyTox(Method):
    paper = "Douillard et al., CVPR 2022 (arXiv 2111.11326)"
    tags = frozenset({GROWS, USES_MEMORY})
    constraints = {"embed_dim": Interval(1, None), "depth": Interval(1, None),
                   "num_heads": Interval(1, None), "patch_size": Interval(1, None),
                   "mlp_ratio": Interval(0, None, "neither"), "drop_path": Interval(0, 1, "left"),
                   "epochs": Interval(0, None), "finetune_epochs": Interval(0, None),
                   "batch_size": Interval(1, None), "lr": Interval(0, None, "neither"),
                   "finetune_lr": Interval(0, None, "neither"), "weight_decay": Interval(0, None),
                   "warmup_epochs": Interval(0, None), "min_lr": Interval(0, None),
                   "memory_size": Interval(0, None), "div_weight": Interval(0, None),
                   "tau": Interval(0, None, "neither"), "mixup": Interval(0, None),
                   "smoothing": Interval(0, 1, "left")}

    @classmethod
    def requirements(cls, hp: dict) -> list[Needs]:
        return [Needs(PIXELS, streams=NEW_CLASSES),  # its own ViT on raw pixels
                Needs(PIXELS, size_multiple=hp["patch_size"],
                      because=f"patch_size={hp['patch_size']}")]

    def __init__(self, backbone, *, embed_dim: int = 384, depth: int = 5, num_heads: int = 12,
                 patch_size: int = 4, mlp_ratio: float = 4.0, drop_path: float = 0.1,
                 epochs: int = 500, finetune_epochs: int = 20, batch_size: int = 256,
                 lr: float = 5e-4, finetune_lr: float = 5e-5, weight_decay: float = 1e-6,
                 warmup_epochs: int = 5, min_lr: float = 1e-5, memory_size: int = 2000,
                 selection: Literal["herding", "barycenter", "random"] = "herding",
                 div_weight: float = 0.1, tau: float = 1.0, mixup: float = 0.0,
                 smoothing: float = 0.1,
                 augment: Literal["none", "crop", "crop_flip"] = "crop_flip"):
        super().__init__(backbone)
        self.embed_dim = embed_dim  # token width (384 in the paper)
        self.depth = depth  # self-attention blocks of the shared encoder; one TAB follows
        self.num_heads = num_heads
        self.patch_size = patch_size  # 4 on 32-px CIFAR (64 tokens), 16 on 224-px ImageNet
        self.mlp_ratio = mlp_ratio
        self.drop_path = drop_path  # stochastic depth of the TAB, linear from 0 over the SABs
        self.epochs = epochs  # per task (500 in the paper, task 0 included)
        self.finetune_epochs = finetune_epochs  # balanced finetuning after tasks t > 0
        self.batch_size = batch_size
        self.lr = lr  # AdamW base LR, scaled by batch_size / 512
        self.finetune_lr = finetune_lr  # constant, scaled by batch_size / 512
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs  # linear from 1e-6, then cosine down to min_lr
        self.min_lr = min_lr
        self.memory_size = memory_size  # total exemplars (global memory)
        self.selection = selection  # how rehearsal exemplars are chosen
        self.div_weight = div_weight  # λ_div; 0 disables the divergence head
        self.tau = tau  # distillation temperature
        self.mixup = mixup  # MixUp α; > 0 is DyTox+ (0.8)
        self.smoothing = smoothing  # label smoothing, applied with MixUp only (as timm's Mixup)
        self.augment = augment
        self.net_: DyToxNet | None = None
        self.memory_ = ExemplarMemory(memory_size, selection=selection)

    # -- learning -------------------------------------------------------------------------------
    def _learn(self, task: Task, ctx: Context) -> None:
        n_old = task.num_seen - len(task.new_classes)
        self._check(task, n_old)
        with seeded(ctx.generator(task.id, 0), ctx.device):
            if self.net_ is None:
                self.net_ = self._build()
            teacher = frozen_copy(self.net_).to(ctx.device) if task.id > 0 else None
            divergence = task.id > 0 and self.div_weight > 0
            self.net_.add_task(len(task.new_classes), divergence)
            self._agree(ctx)
            self.net_.to(ctx.device)
            self._freeze(finetuning=False)
            data = Split.concat([task.train, self.memory_.as_split()]) if len(self.memory_) \
                else task.train
            self._train(data, ctx, teacher, epochs=self.epochs, lr=self.lr,
                        generator=ctx.generator(task.id, 1), schedule=True)
            self.net_.div_head = None  # training only
            feats = self._embeddings(task.train, ctx)  # (N, t·D), no augmentation
            self.memory_.update(task.train, feats, ctx.generator(task.id, 2))
            if task.id > 0 and self.finetune_epochs:  # balanced finetuning on the memory
                self._freeze(finetuning=True)
                self._train(self.memory_.as_split(), ctx, None, epochs=self.finetune_epochs,
                            lr=self.finetune_lr, generator=ctx.generator(task.id, 3),
                            schedule=False)
        self.net_.requires_grad_(False).eval()

    def _check(self, task: Task, n_old: int) -> None:
        if not isinstance(self.backbone.model, nn.Identity):
            raise ConfigError("dytox trains its own ViT on raw pixels: use the backbone "
                              f"'pixels_rgb' (or 'pixels'), not {self.backbone.name!r}")
        if self.backbone.preprocess.size % self.patch_size:
            raise ConfigError(f"dytox: image size {self.backbone.preprocess.size} is not a "
                              f"multiple of patch_size {self.patch_size}")
        if task.new_classes != tuple(range(n_old, task.num_seen)):
            raise ConfigError("dytox needs new classes in every task, labelled after the old "
                              "ones (class- or task-incremental streams)")

    def _build(self) -> DyToxNet:
        pre = self.backbone.preprocess
        return build_dytox(pre.size, pre.channels, patch_size=self.patch_size,
                           embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                           mlp_ratio=self.mlp_ratio, drop_path=self.drop_path)

    def _agree(self, ctx: Context) -> None:
        """Growth is decided on rank 0: its new task token and heads on every rank."""
        net = self.net_
        new = [net.tokens[-1], *net.heads[-1].parameters()]
        new += [] if net.div_head is None else list(net.div_head.parameters())
        for p in new:
            ctx.dist.broadcast_(p.data)

    def _freeze(self, finetuning: bool) -> None:
        """Task training: old tokens and heads frozen. Finetuning: the encoder frozen."""
        net = self.net_
        net.requires_grad_(True)
        if finetuning:
            net.encoder.requires_grad_(False)
            return
        for i in range(len(net.heads) - 1):
            net.tokens[i].requires_grad_(False)
            net.heads[i].requires_grad_(False)

    def _train(self, data: Split, ctx: Context, teacher: DyToxNet | None, *, epochs: int,
               lr: float, generator: torch.Generator, schedule: bool) -> None:
        net, n, bs = self.net_, len(data), self.batch_size
        base = lr * bs / 512
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=base,
                                weight_decay=self.weight_decay)
        targets = torch.from_numpy(data.targets)
        params = [p for g in opt.param_groups for p in g["params"]]

        def forward(x: torch.Tensor, ids: torch.Tensor):  # this rank's rows of the batch
            with global_rows(net, ids):  # stochastic depth: the global batch's draws
                logits, div = net.outputs(x)
            with torch.no_grad():
                old = None if teacher is None else teacher(x)
            return logits, div, old

        def loss_fn(out, y: torch.Tensor) -> torch.Tensor:
            return dytox_loss(*out, y, tau=self.tau, div_weight=self.div_weight)[0]

        for epoch in range(epochs):
            for group in opt.param_groups:
                group["lr"] = self._lr(epoch, epochs, base) if schedule else base
            net.train()
            net.encoder.train(any(p.requires_grad for p in net.encoder.parameters()))
            perm = torch.randperm(n, generator=generator).numpy()
            for start in range(0, n, bs):
                pos = perm[start : start + bs]
                x, y = self._batch(data, pos, targets[pos], generator)  # the global batch
                opt.zero_grad(set_to_none=True)
                backward_share(forward, loss_fn, (x, row_ids(len(pos))), y, ctx, params)
                opt.step()
        ctx.dist.same_state(net, generator)
        net.eval()

    def _lr(self, epoch: int, epochs: int, base: float) -> float:
        """timm's per-epoch cosine with linear warm-up from 1e-6 (DyTox ``create_scheduler``),
        stepped after each epoch as ``main.py`` does: epoch e > 0 runs at the value for e - 1."""
        e = max(epoch - 1, 0)
        if e < self.warmup_epochs:
            return 1e-6 + e * (base - 1e-6) / self.warmup_epochs
        return self.min_lr + 0.5 * (base - self.min_lr) * (1 + math.cos(math.pi * e / epochs))

    def _batch(self, data: Split, pos: np.ndarray, y: torch.Tensor, g: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented images (B, C, S, S) and soft targets (B, C_seen), mixed when ``mixup``."""
        x = self.backbone.preprocess(data, pos)  # (B, C, S, S)
        if self.augment != "none":
            x = crop_flip(x, g, pad=4, flip=self.augment == "crop_flip")
        smoothing = self.smoothing if self.mixup > 0 else 0.0
        target = soft_targets(y, self.net_.num_classes, smoothing)  # (B, C_seen)
        if self.mixup > 0:
            x, target = mixup(x, target, self.mixup, g)
        return x, target

    def _embeddings(self, split: Split, ctx: Context) -> torch.Tensor:
        """(N, t·D) concatenated task embeddings e_1..e_t, without augmentation (herding)."""
        model = TaskEmbeddings(self.net_)
        return predict_batches(model, image_inputs(self.backbone, split), len(split), ctx)

    # -- prediction and state -------------------------------------------------------------------
    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        return predict_batches(self.net_, image_inputs(self.backbone, split), len(split), ctx)

    def _state(self) -> dict[str, torch.Tensor]:
        net = {f"net.{k}": v.detach().cpu() for k, v in self.net_.state_dict().items()}
        return net | self.memory_.state("memory.")

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        heads = sum(k.startswith("net.heads.") and k.endswith(".fc.bias") for k in state)
        with torch.random.fork_rng(devices=[]):
            self.net_ = self._build()
            for i in range(heads):
                self.net_.add_task(len(state[f"net.heads.{i}.fc.bias"]), divergence=False)
        self.net_.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        self.net_.requires_grad_(False).eval()
        self.memory_ = ExemplarMemory(self.memory_size, selection=self.selection)
        self.memory_.load(state, "memory.")

    def parameter_counts(self) -> dict[str, int]:
        n = 0 if self.net_ is None else count(self.net_)
        return {"trainable": n, "total": n + count(self.backbone.model)}

