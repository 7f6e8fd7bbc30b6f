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
"""

from __future__ import annotations

from ..context import Context
from ..params import Interval
from ..scenarios.base import Task
from ..training import carrying, distill_loss, fit_with, inputs_of, teacher_logits
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

