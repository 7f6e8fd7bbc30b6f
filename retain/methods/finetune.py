"""Sequential fine-tuning: the lower bound of every continual-learning table.

The network (backbone + a linear head grown with each task) is trained with cross-entropy on the
current task's data only, over the logits of every class seen so far; nothing protects the old
classes, so they are forgotten. With ``freeze_backbone`` only the head is trained, on cached
frozen features (a sequential linear probe). It needs no task boundary: on a task-free stream
(``TaskFree{k}:...``) every unmarked segment is one more call, the head growing to the largest
label observed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..context import Context
from ..datasets.base import Split
from ..layers.heads import IncrementalLinear
from ..params import Interval
from ..scenarios.base import Task
from ..training import load_prefixed, predict, train
from .base import TASK_FREE, Method, count, register_method


@register_method("finetune")
class Finetune(Method):
    paper = "lower bound (sequential fine-tuning)"
    tags = frozenset({TASK_FREE})  # on a task-free stream: online fine-tuning, segment by segment
    constraints = {"epochs": Interval(1, None), "lr": Interval(0, None, "neither"),
                   "batch_size": Interval(1, None), "weight_decay": Interval(0, None),
                   "momentum": Interval(0, 1, "left")}

    def __init__(self, backbone, *, epochs: int = 1, lr: float = 0.01, batch_size: int = 32,
                 weight_decay: float = 0.0, momentum: float = 0.9, freeze_backbone: bool = False):
        super().__init__(backbone)
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.freeze_backbone = freeze_backbone
        self.net_: nn.Module | None = None
        self.head_: IncrementalLinear | None = None

    def _learn(self, task: Task, ctx: Context) -> None:
        if self.head_ is None:
            self.net_, self.head_ = self._fresh()
        self.head_.expand(task.num_seen, ctx.generator(task.id, 0))
        train(self, task.train, ctx, ctx.generator(task.id, 1))

    def _fresh(self) -> tuple[nn.Module | None, IncrementalLinear]:
        net = None if self.freeze_backbone else copy.deepcopy(self.backbone.model)
        return net, IncrementalLinear(self.backbone.feature_dim)

    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        return predict(self, split, ctx)

    def _state(self) -> dict[str, torch.Tensor]:
        state = {f"head.{k}": v for k, v in self.head_.state_dict().items()}
        if self.net_ is not None:
            state |= {f"net.{k}": v for k, v in self.net_.state_dict().items()}
        return state

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.net_, self.head_ = self._fresh()
        self.head_.expand(state["head.weight"].shape[0])
        load_prefixed(self.head_, state, "head.")
        if self.net_ is not None:
            load_prefixed(self.net_, state, "net.")

    def parameter_counts(self) -> dict[str, int]:
        head = 0 if self.head_ is None else count(self.head_)
        body = count(self.backbone.model)
        return {"trainable": head + (0 if self.freeze_backbone else body), "total": head + body}

