"""LayUP (Ahrens et al., "Read Between the Layers: Leveraging Multi-Layer Representations for
Rehearsal-Free Continual Learning with Pre-Trained Models", TMLR 2024; official ky-ah/LayUP).

Optional first-session adaptation (FSA: VPT-deep with 10 zero-initialised prompt tokens by
default, as the official ``--finetune_method vpt``), then the network is frozen. Each image is
represented by the CLS tokens output by the last k = 6 blocks, concatenated (k·D = 4,608 for
ViT-B/16), and classified by a ridge head: G += XᵀX, c += XᵀY per task, W = (G + λI)⁻¹c. λ is
chosen per task by 4-fold stratified cross-validation on the current task with the previous G
and c added in (accuracy criterion, candidates logspace(-4, 3, 15) ∪ {1e-8}), as the official
``optimize_ridge``, with one eigendecomposition per fold for all candidates. Not followed: the
official FSA's early stopping on a validation split (the epochs run in full here). The FSA's
cosine learning rate steps once per epoch (``schedule_unit="epoch"``, as the official
``main.py``: ``CosineAnnealingLR(T_max=finetune_epochs)``); ``"step"`` decays it per batch.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..adaptation import adapt_for, load_tuned, tuned_state
from ..backbones import Backbone
from ..context import Context
from ..datasets.base import Split
from ..layers.multilayer import multilayer_backbone
from ..layers.ridge import RidgeStatistics, select_lambda_cv
from ..params import Interval
from ..scenarios.base import Task
from ..training import ScheduleUnit
from .base import FROZEN_AFTER_FIRST, Method, count, register_method

# the official VPT: 10 zero-initialised tokens appended after the patches (PILOT's placement)
PEFT_OPTIONS = {"vpt_deep": {"num_tokens": 10, "placement": "pilot"},
                "vpt_shallow": {"num_tokens": 10, "placement": "pilot"}}


@register_method("layup")
class LayUP(Method):
    paper = "Ahrens et al., TMLR 2024 (arXiv 2312.08888)"
    tags = frozenset({FROZEN_AFTER_FIRST})
    constraints = {"layers": Interval(1, None), "epochs": Interval(0, None),
                   "lr": Interval(0, None, "neither"), "batch_size": Interval(1, None),
                   "folds": Interval(2, None)}

    def __init__(self, backbone, *, layers: int = 6,
                 peft: Literal["none", "finetune", "adapter", "ssf", "vpt_shallow",
                               "vpt_deep"] = "vpt_deep",
                 epochs: int = 20, lr: float = 0.003, batch_size: int = 48,
                 weight_decay: float = 5e-4, momentum: float = 0.9, augment: bool = True,
                 folds: int = 4, schedule_unit: ScheduleUnit = "epoch"):
        super().__init__(backbone)
        self.layers = layers
        self.peft = peft
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.augment = augment
        self.folds = folds
        self.schedule_unit = schedule_unit  # FSA cosine per epoch (official) or per batch
        self.body_: Backbone | None = None  # multi-layer view of the (adapted) network
        self.tuned_: torch.nn.Module | None = None
        self.stats_: RidgeStatistics | None = None
        self.weights_: torch.Tensor | None = None  # (k·D, C)
        self.lambdas_: list[float] = []

    def _learn(self, task: Task, ctx: Context) -> None:
        if task.id == 0:
            body, self.tuned_ = adapt_for(self, task, ctx, PEFT_OPTIONS.get(self.peft))
            self.body_ = multilayer_backbone(body, self.layers)
            self.stats_ = RidgeStatistics(self.body_.feature_dim)
        x = ctx.features(self.body_, task.train)  # (N, k·D)
        y = torch.from_numpy(task.train.targets)
        lam, _ = select_lambda_cv(x, y, task.num_seen, self.stats_, folds=self.folds)
        self.lambdas_.append(lam)
        self.stats_.update(x, y, task.num_seen)
        self.weights_ = self.stats_.solve(lam).float()

    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        return ctx.features(self.body_, split) @ self.weights_  # (N, C)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"weights": self.weights_, "lambdas": torch.tensor(self.lambdas_),
                **self.stats_.state("ridge."), **tuned_state(self.tuned_)}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.weights_ = state["weights"]
        self.lambdas_ = state["lambdas"].tolist()
        body, self.tuned_ = load_tuned(self.backbone, self.peft, state,
                                       PEFT_OPTIONS.get(self.peft))
        self.body_ = multilayer_backbone(body, self.layers)
        self.stats_ = RidgeStatistics(self.body_.feature_dim)
        self.stats_.load(state, "ridge.")

    def parameter_counts(self) -> dict[str, int]:
        base = count(self.backbone.model)
        tuned = 0 if self.tuned_ is None else count(self.tuned_, trainable_only=False)
        head = 0 if self.weights_ is None else self.weights_.numel()
        extra = 0 if self.peft == "finetune" else tuned
        return {"trainable": tuned + head, "total": base + extra + head}
