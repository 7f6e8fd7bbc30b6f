"""Experience replay: cross-entropy on the current task's batch plus a batch from a memory.

The whole network (backbone + linear head, as ``finetune``) is trained with

    L = CE(z, y) over [current batch ; memory batch],

the memory batch (``memory_batch_size`` exemplars, drawn without replacement at every step) coming
from a class-balanced exemplar memory with a fixed total budget (``retain.memory.ExemplarMemory``:
budget // classes seen per class; old classes shrunk to their best-ranked exemplars when new ones
arrive). Exemplars are selected after each task, by herding on the trained network's features by
default (PyCIL ``build_rehearsal_memory``) or at random.

Followed: PyCIL ``models/replay.py`` (CE over all seen classes, herding memory of 2000) and the
ER step of Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019 / Mammoth
``models/er.py`` (each step concatenates a memory minibatch to the stream minibatch).
Deviations: PyCIL appends the memory to the training set instead of drawing a memory batch per
step; Mammoth fills a reservoir buffer during the stream (not class-balanced); here the memory is
class-balanced and updated at task end. SGD + cosine (``retain.training.fit``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..context import Context
from ..memory import ExemplarMemory, Selection
from ..params import Interval
from ..scenarios.base import Task
from ..training import Inputs, features_of, fit_with, inputs_of
from .base import USES_MEMORY, register_method
from .finetune import Finetune


@register_method("replay")
class Replay(Finetune):
    paper = "experience replay (Chaudhry et al. 2019; PyCIL models/replay.py)"
    tags = frozenset({USES_MEMORY})
    constraints = Finetune.constraints | {"memory_size": Interval(1, None),
                                          "memory_batch_size": Interval(1, None)}

    def __init__(self, backbone, *, epochs: int = 1, lr: float = 0.01, batch_size: int = 32,
                 weight_decay: float = 0.0, momentum: float = 0.9, freeze_backbone: bool = False,
                 memory_size: int = 2000, memory_per_class: bool = False,
                 selection: Selection = "herding", memory_batch_size: int = 32):
        super().__init__(backbone, epochs=epochs, lr=lr, batch_size=batch_size,
                         weight_decay=weight_decay, momentum=momentum,
                         freeze_backbone=freeze_backbone)
        self.memory_size = memory_size  # exemplars in total (per class if memory_per_class)
        self.memory_per_class = memory_per_class
        self.selection = selection  # herding, barycenter or random
        self.memory_batch_size = memory_batch_size  # exemplars appended to every batch
        self.memory_ = self._memory()

    def _memory(self) -> ExemplarMemory:
        return ExemplarMemory(self.memory_size, per_class=self.memory_per_class,
                              selection=self.selection)

    def _learn(self, task: Task, ctx: Context) -> None:
        if self.head_ is None:
            self.net_, self.head_ = self._fresh()
        self.head_.expand(task.num_seen, ctx.generator(task.id, 0))
        x = self._with_memory(inputs_of(self, task.train, ctx), ctx, ctx.generator(task.id, 3))

        def loss_fn(out, y):
            logits, y_memory = out  # (B + K, C), (K,)
            return F.cross_entropy(logits, torch.cat([y, y_memory]))

        fit_with(self, x, task.train.targets, ctx, ctx.generator(task.id, 1), loss_fn)
        feats = None if self.selection == "random" else features_of(self, task.train, ctx)
        self.memory_.update(task.train, feats, ctx.generator(task.id, 2))

    def _with_memory(self, inputs: Inputs, ctx: Context, generator: torch.Generator) -> Inputs:
        """Positions -> ([current batch ; memory batch], memory labels (K,)); K = 0 before the
        memory holds anything."""
        if not len(self.memory_):
            return lambda pos: (inputs(pos), torch.zeros(0, dtype=torch.long))
        memory = self.memory_.as_split()
        memory_inputs = inputs_of(self, memory, ctx)
        k = min(self.memory_batch_size, len(memory))

        def batch(pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            draw = torch.randperm(len(memory), generator=generator)[:k].numpy()
            x = torch.cat([inputs(pos), memory_inputs(draw)])  # (B + K, ...)
            return x, torch.from_numpy(memory.targets[draw])

        return batch

    def _state(self) -> dict[str, torch.Tensor]:
        return super()._state() | self.memory_.state("memory.")

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.memory_ = self._memory()
        self.memory_.load(state, "memory.")
        super()._load_state({k: v for k, v in state.items() if not k.startswith("memory.")})
