"""SimpleCIL (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need", IJCV 2024; LAMDA-PILOT ``simplecil.py``).

Nothing is trained: the backbone stays frozen, each new class gets the mean of its training
features as prototype, and a test sample is scored by cosine similarity to every prototype.
Cost per task: one frozen pass over the new training images (the floor for every method).
In a domain-incremental stream only the first task brings new classes, so only it is used.
"""

from __future__ import annotations

import torch

from ..context import Context
from ..datasets.base import Split
from ..layers.heads import CosineHead, class_means
from ..scenarios.base import Task
from .base import FROZEN_BACKBONE, Method, count, register_method


@register_method("simplecil")
class SimpleCIL(Method):
    paper = "Zhou et al., IJCV 2024 (arXiv 2303.07338)"
    tags = frozenset({FROZEN_BACKBONE})

    def __init__(self, backbone):
        super().__init__(backbone)
        self.head_: CosineHead | None = None

    def _learn(self, task: Task, ctx: Context) -> None:
        if not task.new_classes:  # domain streams: the classes already have their prototypes
            return
        feats = ctx.features(self.backbone, task.train)  # (N, D)
        targets = torch.from_numpy(task.train.targets)
        if self.head_ is None:
            self.head_ = CosineHead(self.backbone.feature_dim, learn_sigma=False)
        self.head_.append(class_means(feats, targets, task.new_classes))  # (C, D)

    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        return self.head_(ctx.features(self.backbone, split))  # (N, C)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"prototypes": self.head_.weight.data}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.head_ = CosineHead(self.backbone.feature_dim, learn_sigma=False)
        self.head_.append(state["prototypes"])

    def parameter_counts(self) -> dict[str, int]:
        protos = 0 if self.head_ is None else self.head_.weight.numel()
        return {"trainable": 0, "total": count(self.backbone.model) + protos}
