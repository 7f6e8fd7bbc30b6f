"""Joint training: the upper bound. At every stage the network is trained afresh (from the
pre-trained backbone) on the union of every task's training data seen so far. It stores all past
data, so it is a reference point, not a continual-learning method."""

from __future__ import annotations

import torch

from ..context import Context
from ..memory import SampleStore
from ..scenarios.base import Task
from ..training import train
from .base import UPPER_BOUND, USES_MEMORY, register_method
from .finetune import Finetune


@register_method("joint")
class Joint(Finetune):
    paper = "upper bound (joint training on all data seen so far)"
    tags = frozenset({UPPER_BOUND, USES_MEMORY})

    def __init__(self, backbone, *, epochs: int = 1, lr: float = 0.01, batch_size: int = 32,
                 weight_decay: float = 0.0, momentum: float = 0.9, freeze_backbone: bool = False):
        super().__init__(backbone, epochs=epochs, lr=lr, batch_size=batch_size,
                         weight_decay=weight_decay, momentum=momentum,
                         freeze_backbone=freeze_backbone)
        self.seen_ = SampleStore()

    def _learn(self, task: Task, ctx: Context) -> None:
        self.seen_.add(task.train)
        self.net_, self.head_ = self._fresh()
        self.head_.expand(task.num_seen, ctx.generator(task.id, 0))
        train(self, self.seen_.as_split(), ctx, ctx.generator(task.id, 1))

    def _state(self) -> dict[str, torch.Tensor]:
        return super()._state() | self.seen_.state("seen.")

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.seen_.load(state, "seen.")
        super()._load_state({k: v for k, v in state.items() if not k.startswith("seen.")})
