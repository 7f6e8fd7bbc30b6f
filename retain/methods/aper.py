"""APER / ADAM (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need", IJCV 2024; LAMDA-PILOT
``models/aper_{adapter,ssf,vpt,finetune}.py``, ``MultiBranchCosineIncrementalNet``).

On the first task only, a copy of the pre-trained network is adapted with one of five
variants (``peft``): full fine-tuning, VPT-shallow, VPT-deep, SSF or the AdaptFormer adapter,
with a cosine head and cross-entropy; then everything is frozen. Every class (the first task's
too, after adaptation) gets as prototype the mean of the concatenated features
[φ_PTM(x); φ_adapted(x)] (2·D), and a test image is scored by cosine similarity to each
prototype. Cost: two frozen passes per image, each cached once.

The adaptation's cosine learning rate steps once per epoch (``schedule_unit="epoch"``, as the
official ``models/adam_*.py`` and PILOT: ``CosineAnnealingLR(T_max=tuned_epoch)``); ``"step"``
decays it after every batch instead.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..adaptation import adapt_for, load_tuned, tuned_state
from ..backbones import Backbone
from ..context import Context
from ..datasets.base import Split
from ..layers.heads import CosineHead, class_means
from ..params import Interval
from ..scenarios.base import Task
from ..training import ScheduleUnit
from .base import FROZEN_AFTER_FIRST, VIT_OR_CLIP, Method, Needs, count, register_method


@register_method("aper")
class APER(Method):
    paper = "Zhou et al., IJCV 2024 (arXiv 2303.07338)"
    tags = frozenset({FROZEN_AFTER_FIRST})
    constraints = {"epochs": Interval(0, None), "lr": Interval(0, None, "neither"),
                   "batch_size": Interval(1, None), "weight_decay": Interval(0, None),
                   "vpt_tokens": Interval(1, None), "adapter_bottleneck": Interval(1, None)}

    @classmethod
    def requirements(cls, hp: dict) -> list[Needs]:
        if hp["peft"] == "finetune":
            return [Needs()]
        return [Needs(VIT_OR_CLIP, because=f"peft={hp['peft']}", fix="--set params.peft=finetune")]

    def __init__(self, backbone, *,
                 peft: Literal["finetune", "vpt_shallow", "vpt_deep", "ssf",
                               "adapter"] = "adapter",
                 epochs: int = 20, lr: float = 0.01, batch_size: int = 48,
                 weight_decay: float = 5e-4, momentum: float = 0.9, augment: bool = True,
                 vpt_tokens: int = 5, adapter_bottleneck: int = 64,
                 schedule_unit: ScheduleUnit = "epoch"):
        super().__init__(backbone)
        self.peft = peft
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.augment = augment
        self.vpt_tokens = vpt_tokens  # prompt tokens per layer (peft=vpt_shallow / vpt_deep)
        self.adapter_bottleneck = adapter_bottleneck
        self.schedule_unit = schedule_unit  # cosine stepped per epoch (official) or per batch
        self.adapted_: Backbone | None = None
        self.tuned_: torch.nn.Module | None = None
        self.head_: CosineHead | None = None

    def _options(self) -> dict:
        if self.peft.startswith("vpt"):  # PILOT's VPT: zero-initialised, after the patches
            return {"num_tokens": self.vpt_tokens, "placement": "pilot"}
        if self.peft == "adapter":
            return {"bottleneck": self.adapter_bottleneck}
        return {}

    def _learn(self, task: Task, ctx: Context) -> None:
        if task.id == 0:
            self.adapted_, self.tuned_ = adapt_for(self, task, ctx, self._options())
            self.head_ = CosineHead(2 * self.backbone.feature_dim, learn_sigma=False)
        if task.new_classes:
            feats = self._features(task.train, ctx)  # (N, 2D)
            targets = torch.from_numpy(task.train.targets)
            self.head_.append(class_means(feats, targets, task.new_classes))

    def _features(self, split: Split, ctx: Context) -> torch.Tensor:
        """[φ_PTM(x); φ_adapted(x)] (N, 2D), both from the feature cache."""
        return torch.cat([ctx.features(self.backbone, split),
                          ctx.features(self.adapted_, split)], dim=1)

    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        return self.head_(self._features(split, ctx))  # (N, C)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"prototypes": self.head_.weight.data, **tuned_state(self.tuned_)}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.adapted_, self.tuned_ = load_tuned(self.backbone, self.peft, state,
                                                self._options())
        self.head_ = CosineHead(2 * self.backbone.feature_dim, learn_sigma=False)
        self.head_.append(state["prototypes"])

    def parameter_counts(self) -> dict[str, int]:
        base = count(self.backbone.model)
        tuned = 0 if self.tuned_ is None else count(self.tuned_, trainable_only=False)
        protos = 0 if self.head_ is None else self.head_.weight.numel()
        branch = base if self.peft == "finetune" else tuned  # a second network, or a module
        return {"trainable": tuned, "total": base + branch + protos}
