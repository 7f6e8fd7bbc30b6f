"""LwF: Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017).

The whole network (backbone + a linear head grown with each task, as ``finetune``) is trained on
the current task alone with

    L = CE(z[:, task classes], y) + λ_kd · KD(z[:, :old], z_old, T),

where z_old are the logits of the network as it was before the task (the teacher) over the old
classes, and KD is the cross-entropy between the temperature-softened teacher and student
distributions (``retain.layers.distill.kd_loss``).

Followed: PyCIL ``models/lwf.py`` (G-U-N/PyCIL): CE over the new classes' logits only
(``logits[:, known:]``), ``_KD_loss`` with T = 2 (no T² factor), weight ``lamda = 3``; plain CE
on the first task. Deviations: our training has no augmentation, so the teacher's logits are
computed once per image before training (one no-grad pass, exactly the values PyCIL's frozen old
network gives every epoch) instead of keeping a copy of the old network; SGD + cosine schedule
(``retain.training.fit``) instead of MultiStepLR; one schedule for every task (PyCIL has a
separate ``init_*`` schedule for the first).

The helpers at the bottom (network, inputs, features of the current network, ``fit`` with a
per-sample extra) are shared by ``ewc``, ``icarl`` and ``replay``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..context import Context
from ..datasets.base import Split
from ..layers.distill import Carry, kd_loss
from ..params import Interval
from ..scenarios.base import Task
from ..training import (
    Inputs,
    feature_inputs,
    fit,
    image_inputs,
    predict_batches,
    task_cross_entropy,
)
from .base import register_method
from .finetune import Finetune


@register_method("lwf")
class LwF(Finetune):
    paper = "Li & Hoiem, Learning without Forgetting, ECCV 2016 / TPAMI 2017"
    tags = frozenset()  # not finetune's task_free: its teacher is the model of the last task
    constraints = Finetune.constraints | {"temperature": Interval(0, None, "neither"),
                                          "kd_weight": Interval(0, None)}

    def __init__(self, backbone, *, epochs: int = 1, lr: float = 0.01, batch_size: int = 32,
                 weight_decay: float = 0.0, momentum: float = 0.9, freeze_backbone: bool = False,
                 temperature: float = 2.0, kd_weight: float = 3.0):
        super().__init__(backbone, epochs=epochs, lr=lr, batch_size=batch_size,
                         weight_decay=weight_decay, momentum=momentum,
                         freeze_backbone=freeze_backbone)
        self.temperature = temperature  # T of the softened distributions
        self.kd_weight = kd_weight  # λ_kd (PyCIL ``lamda``)

    def _learn(self, task: Task, ctx: Context) -> None:
        if self.head_ is None:
            self.net_, self.head_ = self._fresh()
        x = inputs_of(self, task.train, ctx)
        teacher = teacher_logits(self, x, len(task.train), ctx)  # (N, old)
        self.head_.expand(task.num_seen, ctx.generator(task.id, 0))

        def loss_fn(out, y):
            logits, t = out  # (B, C), (B, old)
            return distill_loss(logits, y, t, task.classes, self.kd_weight, self.temperature)

        fit_with(self, carrying(x, teacher), task.train.targets, ctx, ctx.generator(task.id, 1),
                 loss_fn)


def distill_loss(logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor, classes,
                 kd_weight: float, temperature: float) -> torch.Tensor:
    """CE over ``classes`` (None: every class) + λ_kd · KD of the first ``old`` logits (B, old)
    towards the teacher's (B, old); the KD term is absent while there is no old class."""
    ce = F.cross_entropy(logits, y) if classes is None else task_cross_entropy(logits, y, classes)
    old = teacher.shape[1]
    if not old:
        return ce
    return ce + kd_weight * kd_loss(logits[:, :old], teacher, temperature)


# -- shared by the classic baselines ----------------------------------------------------------
def network(m) -> nn.Module:
    """The model ``m`` trains: its head alone (frozen backbone, on cached features) or
    backbone copy + head."""
    return m.head_ if m.net_ is None else nn.Sequential(m.net_, m.head_)


def inputs_of(m, split: Split, ctx: Context) -> Inputs:
    """Positions of ``split`` -> what ``network(m)`` takes: cached features or images."""
    if m.net_ is None:
        return feature_inputs(ctx.features(m.backbone, split))
    return image_inputs(m.backbone, split)


def teacher_logits(m, inputs: Inputs, n: int, ctx: Context) -> torch.Tensor:
    """(n, old) logits of the network as it is now (before the head grows): the teacher."""
    if m.head_.num_classes == 0:
        return torch.zeros(n, 0)
    return predict_batches(network(m), inputs, n, ctx)


def features_of(m, split: Split, ctx: Context) -> torch.Tensor:
    """(len(split), D) features of the current network (the backbone's, cached, if frozen)."""
    if m.net_ is None:
        return ctx.features(m.backbone, split)
    return predict_batches(m.net_, image_inputs(m.backbone, split), len(split), ctx)


def carrying(inputs: Inputs, extra: torch.Tensor) -> Inputs:
    """Positions -> (inputs, extra rows): a per-sample tensor travels with the batch."""
    return lambda pos: (inputs(pos), extra[torch.from_numpy(pos)])


def fit_with(m, inputs: Inputs, targets, ctx: Context, generator: torch.Generator,
             loss_fn: Callable) -> list[float]:
    """Train ``network(m)`` with ``m``'s optimiser settings; ``inputs(pos)`` gives (x, extra)
    and ``loss_fn((logits, extra), y)``."""
    if m.net_ is not None:
        m.net_.requires_grad_(True)
    return fit(Carry(network(m)), inputs, torch.as_tensor(targets), ctx, epochs=m.epochs,
               lr=m.lr, batch_size=m.batch_size, weight_decay=m.weight_decay,
               momentum=m.momentum, generator=generator, loss_fn=loss_fn, desc=f"{m.name} task")
