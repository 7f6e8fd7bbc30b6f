"""iCaRL: incremental Classifier and Representation Learning (Rebuffi et al., CVPR 2017).

The whole network (backbone + linear head, as ``finetune``) is trained on the current task's data
together with a memory of exemplars,

    L = CE(z, y) + λ_kd · KD(z[:, :old], z_old, T)    over task data ∪ exemplars,

then exemplars of the new classes are chosen by herding on the L2-normalised features of the
trained network under a fixed total budget (``retain.memory.ExemplarMemory``: budget // classes
per class, old classes shrunk to their best-ranked exemplars). Prediction is the
nearest-mean-of-exemplars rule: logit_c = -‖f̂(x) - μ̂_c‖², f̂ the normalised feature, μ̂_c the
normalised mean of class c's normalised exemplar features, recomputed for every class with the
current network after each task.

Followed: PyCIL ``models/icarl.py`` and LAMDA-PILOT ``models/icarl.py`` + ``exps/icarl.json``
(CE over all classes + ``_KD_loss`` T = 2, weight 1; memory 2000 with ``fixed_memory`` false;
herding and NME as ``BaseLearner._construct_exemplar`` / ``_eval_nme``). PyCIL's newer iCaRL
replaced the paper's sigmoid BCE distillation with this softmax KD; we follow PyCIL.

CNN vs NME (protocol pitfall 13): PyCIL reports both; ``classifier="nme"`` (default) predicts
with the exemplar means (iCaRL's classifier), ``"cnn"`` with the trained linear head. Results
must name which one was used. Deviations: the teacher's logits are computed once per image before
training (no augmentation, so identical to a frozen old network); exemplar means use no
horizontal-flip copies; a class whose exemplars were all dropped (budget < classes) gets logit
-5, below every reachable -‖f̂ - μ̂‖² ≥ -4; SGD + cosine (``retain.training.fit``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..context import Context
from ..datasets.base import Split
from ..memory import ExemplarMemory, Selection
from ..params import Interval
from ..scenarios.base import Task
from ..training import (
    carrying,
    distill_loss,
    features_of,
    fit_with,
    inputs_of,
    predict,
    teacher_logits,
)
from .base import USES_MEMORY, register_method
from .finetune import Finetune

MISSING = -5.0  # logit of a class without exemplars: below any -‖f̂ - μ̂‖² of unit vectors


@register_method("icarl")
class ICaRL(Finetune):
    paper = "Rebuffi et al., iCaRL: Incremental Classifier and Representation Learning, CVPR 2017"
    tags = frozenset({USES_MEMORY})
    constraints = Finetune.constraints | {"temperature": Interval(0, None, "neither"),
                                          "kd_weight": Interval(0, None),
                                          "memory_size": Interval(1, None)}

    def __init__(self, backbone, *, epochs: int = 1, lr: float = 0.01, batch_size: int = 32,
                 weight_decay: float = 0.0, momentum: float = 0.9, freeze_backbone: bool = False,
                 temperature: float = 2.0, kd_weight: float = 1.0, memory_size: int = 2000,
                 memory_per_class: bool = False, selection: Selection = "herding",
                 classifier: Literal["nme", "cnn"] = "nme"):
        super().__init__(backbone, epochs=epochs, lr=lr, batch_size=batch_size,
                         weight_decay=weight_decay, momentum=momentum,
                         freeze_backbone=freeze_backbone)
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.memory_size = memory_size  # exemplars in total (per class if memory_per_class)
        self.memory_per_class = memory_per_class  # PyCIL ``fixed_memory``
        self.selection = selection  # herding (iCaRL), barycenter or random
        self.classifier = classifier  # nme: nearest mean of exemplars; cnn: the linear head
        self.memory_ = self._memory()
        self.means_: torch.Tensor | None = None  # (C, D) normalised exemplar means

    def _memory(self) -> ExemplarMemory:
        return ExemplarMemory(self.memory_size, per_class=self.memory_per_class,
                              selection=self.selection)

    def _learn(self, task: Task, ctx: Context) -> None:
        if self.head_ is None:
            self.net_, self.head_ = self._fresh()
        data = task.train if not len(self.memory_) else Split.concat(
            [task.train, self.memory_.as_split()])
        x = inputs_of(self, data, ctx)
        teacher = teacher_logits(self, x, len(data), ctx)  # (N, old)
        self.head_.expand(task.num_seen, ctx.generator(task.id, 0))

        def loss_fn(out, y):
            logits, t = out  # (B, C), (B, old)
            return distill_loss(logits, y, t, None, self.kd_weight, self.temperature)

        fit_with(self, carrying(x, teacher), data.targets, ctx, ctx.generator(task.id, 1),
                 loss_fn)
        feats = None if self.selection == "random" else features_of(self, task.train, ctx)
        self.memory_.update(task.train, feats, ctx.generator(task.id, 2))
        self.means_ = self._exemplar_means(ctx, task.num_seen)

    def _exemplar_means(self, ctx: Context, num_classes: int) -> torch.Tensor:
        """Exemplar means of every class, with the current network."""
        memory = self.memory_.as_split()
        return exemplar_means(features_of(self, memory, ctx), torch.from_numpy(memory.targets),
                              num_classes)

    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        if self.classifier == "cnn":
            return predict(self, split, ctx)
        return nme_logits(features_of(self, split, ctx), self.means_)

    def _state(self) -> dict[str, torch.Tensor]:
        return super()._state() | {"means": self.means_} | self.memory_.state("memory.")

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.memory_ = self._memory()
        self.memory_.load(state, "memory.")
        self.means_ = state["means"]
        super()._load_state({k: v for k, v in state.items()
                             if not k.startswith("memory.") and k != "means"})


def exemplar_means(features: torch.Tensor, targets: torch.Tensor, num_classes: int
                   ) -> torch.Tensor:
    """(num_classes, D) μ̂_c = normalised mean of the normalised features (M, D) of class c's
    exemplars; zero rows for classes without exemplars."""
    f = F.normalize(features.float(), dim=1)  # (M, D)
    means = torch.zeros(num_classes, f.shape[1])
    for c in targets.unique().tolist():
        means[c] = F.normalize(f[targets == c].mean(0), dim=0)
    return means


def nme_logits(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """(N, C) -‖f̂ - μ̂_c‖² for features (N, D) and normalised means (C, D); zero rows of
    ``means`` (classes without exemplars) get ``MISSING``."""
    f = F.normalize(features.float(), dim=1)  # (N, D)
    dist = (f.pow(2).sum(1, keepdim=True) - 2 * f @ means.T
            + means.pow(2).sum(1))  # (N, C)
    return (-dist).masked_fill(means.norm(dim=1) == 0, MISSING)
