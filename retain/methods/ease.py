"""EASE (Zhou et al., "Expandable Subspace Ensemble for Pre-Trained Model-Based
Class-Incremental Learning", CVPR 2024; LAMDA-PILOT ``models/ease.py``, ``backbone/vit_ease.py``,
``linears.py::EaseCosineLinear``, ``inc_net.py::EaseNet``; configs of sun-hailong/CVPR24-Ease).

Task t trains a fresh AdaptFormer adapter set A_t (the trunk stays frozen) with a temporary
cosine head over the task's classes and cross-entropy on them; A_t is then frozen and kept, so
the model holds t+1 subspaces. Prototypes W (C, T, D): the task's training images (test
transform) through every subspace j give W[c, j] for its classes c. An old class c of task i has
no data in a newer subspace j > i; it gets the semantic-guided complement (:func:`complement`):
with 𝒩 the classes of tasks j..t, S = softmax_row(cos(W[c, i], W[𝒩, i])) in the old subspace
(no temperature, as the official code) and W[c, j] = S @ W[𝒩, j]; every such entry is recomputed
each task (``recalc_sim: true``). A test image x, with feature φ_j in subspace j, scores class c
of task i as (:func:`reweighted_logits`, PILOT's ``forward_reweight``, σ = 1 since the
classifier's σ is never trained):

    z_c = cos(φ_i, W[c, i]) + (α / t) · Σ_{j ≠ i} cos(φ_j, W[c, j])    (t = 0: the first term)

No task id at test time, no exemplars. Cost: each adapter is frozen after its task, so each
subspace is its own frozen ``Backbone`` (identity = hash of trunk and adapter) and its features
go through the cache: over a run each image is embedded once per subspace that sees it, instead
of t+1 passes at every evaluation as in PILOT. With ``cache_features=False`` nothing is cached
and every pass runs the t+1 subspaces in one trunk call (``retain.layers.subspaces``).

The adapter's cosine learning rate steps once per epoch (``schedule_unit="epoch"``, as PILOT's
``models/ease.py``, the authors' code: ``CosineAnnealingLR(T_max=epochs)``); ``"step"`` decays
it after every batch instead. Differences from PILOT: the official options
``use_init_ptm``/``beta`` (a PTM subspace), ``moni_adam`` (the Omnibenchmark config: one
adapter, APER-like) and ``use_old_data`` are not implemented.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adaptation import adapted_backbone
from ..backbones import Backbone
from ..context import Context
from ..datasets.base import Split
from ..layers.adapter import AdapterSet, attach_adapter
from ..layers.heads import CosineHead, class_means
from ..layers.inject import detach
from ..layers.subspaces import MultiAdapterViT
from ..params import Interval
from ..scenarios.base import Task
from ..training import ScheduleUnit, fit, image_inputs, predict_batches
from ..transforms import Augment
from .base import GROWS, NEW_CLASSES, VIT, Method, Needs, count, register_method


@register_method("ease")
class EASE(Method):
    paper = "Zhou et al., CVPR 2024 (arXiv 2403.12030)"
    tags = frozenset({GROWS})
    needs = Needs(VIT, streams=NEW_CLASSES)
    constraints = {"epochs": Interval(0, None), "lr": Interval(0, None, "neither"),
                   "batch_size": Interval(1, None), "weight_decay": Interval(0, None),
                   "momentum": Interval(0, 1, "left"), "adapter_bottleneck": Interval(1, None),
                   "alpha": Interval(0, None)}

    def __init__(self, backbone, *, epochs: int = 20, lr: float = 0.025, batch_size: int = 48,
                 weight_decay: float = 5e-4, momentum: float = 0.9, augment: bool = True,
                 adapter_bottleneck: int = 64, alpha: float = 0.1, cache_features: bool = True,
                 schedule_unit: ScheduleUnit = "epoch"):
        super().__init__(backbone)
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.augment = augment
        self.adapter_bottleneck = adapter_bottleneck
        self.alpha = alpha  # weight of the other subspaces' scores (alpha / t each)
        self.cache_features = cache_features  # cache subspace features
        self.schedule_unit = schedule_unit  # cosine per epoch (official) or per batch
        self.trunk_: nn.Module | None = None  # frozen copy of the backbone, shared by subspaces
        self.adapters_: list[AdapterSet] = []  # A_0..A_t, frozen
        self.subspaces_: list[Backbone] = []  # trunk + A_j as a frozen Backbone (cache key)
        self.prototypes_ = torch.zeros(0, 0, backbone.feature_dim)  # W (C, T, D)
        self.task_of_ = torch.zeros(0, dtype=torch.long)  # (C,) task that brought class c

    # -- learning ---------------------------------------------------------------------------
    def _learn(self, task: Task, ctx: Context) -> None:
        if set(task.classes) != set(task.new_classes) or not task.new_classes:
            raise ValueError("EASE is class-incremental: every task must bring only new classes")
        if self.trunk_ is None:
            self.trunk_ = _frozen_copy(self.backbone.model)
        self._add_subspace(self._train_adapter(task, ctx))
        feats = self._features(task.train, ctx)  # (N, T, D)
        targets = torch.from_numpy(task.train.targets)
        rows = class_means(feats.flatten(1), targets, task.new_classes)  # (k, T·D)
        self._grow(rows.view(len(rows), len(self.adapters_), -1), task.new_classes, task.id)
        self.prototypes_ = complement(self.prototypes_, self.task_of_)

    def _train_adapter(self, task: Task, ctx: Context) -> AdapterSet:
        """A new adapter set on the trunk, trained with a temporary cosine head, then frozen."""
        g = ctx.generator(task.id, 0)
        adapters = attach_adapter(self.trunk_, self.adapter_bottleneck, generator=g)
        head = CosineHead(self.backbone.feature_dim, len(task.new_classes))  # PILOT proxy_fc
        bound = self.backbone.feature_dim ** -0.5
        nn.init.uniform_(head.weight, -bound, bound, generator=g)
        local = {c: k for k, c in enumerate(task.new_classes)}
        targets = torch.tensor([local[int(y)] for y in task.train.targets])  # (N,)
        g = ctx.generator(task.id, 1)  # batch order and augmentation
        try:
            if self.epochs:
                fit(nn.Sequential(self.trunk_, head), self._inputs(task.train, g), targets, ctx,
                    epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                    weight_decay=self.weight_decay, momentum=self.momentum, generator=g,
                    schedule_unit=self.schedule_unit, desc=f"ease adapter {task.id}")
        finally:
            detach(self.trunk_, adapters)
        return adapters.requires_grad_(False).eval()

    def _inputs(self, split: Split, generator: torch.Generator):
        return image_inputs(self.backbone, split, augment=Augment() if self.augment else None,
                            generator=generator)  # (B, 3, S, S)

    def _add_subspace(self, adapters: AdapterSet) -> None:
        self.adapters_.append(adapters)
        model = MultiAdapterViT(self.trunk_, [adapters], flatten=True)  # (B, 3, S, S) -> (B, D)
        name = f"ease_adapter{len(self.subspaces_)}"
        self.subspaces_.append(adapted_backbone(self.backbone, model, name))

    def _grow(self, rows: torch.Tensor, classes: tuple[int, ...], task_id: int) -> None:
        """Add the new classes' prototypes ``rows`` (k, T, D); old classes get a zero block in
        the new subspace (filled by the complement)."""
        c_old, t = len(self.prototypes_), rows.shape[1]
        c_new = max(c_old, max(classes) + 1)
        w = torch.zeros(c_new, t, rows.shape[2])  # (C, T, D)
        w[:c_old, : t - 1] = self.prototypes_
        w[list(classes)] = rows
        task_of = torch.full((c_new,), -1, dtype=torch.long)
        task_of[:c_old] = self.task_of_
        task_of[list(classes)] = task_id
        if (task_of < 0).any():
            raise ValueError(f"classes {torch.nonzero(task_of < 0).flatten().tolist()} never came")
        self.prototypes_, self.task_of_ = w, task_of

    # -- features and prediction ------------------------------------------------------------
    def _features(self, split: Split, ctx: Context) -> torch.Tensor:
        """(N, T, D): the images of ``split`` in every subspace."""
        if self.cache_features:
            return torch.stack([ctx.features(s, split) for s in self.subspaces_], 1)
        model = MultiAdapterViT(self.trunk_, self.adapters_)  # one trunk call for T subspaces

        def inputs(pos: np.ndarray) -> torch.Tensor:
            return self.backbone.preprocess(split, pos)

        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.autocast):
            return predict_batches(model, inputs, len(split), ctx)

    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        feats = self._features(split, ctx)  # (N, T, D)
        return reweighted_logits(feats, self.prototypes_, self.task_of_, self.alpha)  # (N, C)

    def infer_task(self, split: Split, ctx: Context) -> np.ndarray:
        """The task of the predicted class, per sample (PILOT logs it as "Task correct")."""
        return self.task_of_[self.predict(split, ctx).argmax(1)].numpy()

    # -- state ------------------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        state = {"prototypes": self.prototypes_, "task_of": self.task_of_}
        for j, a in enumerate(self.adapters_):
            state |= {f"adapter{j}.{k}": v for k, v in a.state_dict().items()}
        return state

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.trunk_ = _frozen_copy(self.backbone.model)
        self.adapters_, self.subspaces_ = [], []
        dim, depth = self.trunk_.embed_dim, len(self.trunk_.blocks)
        for j in range(state["prototypes"].shape[1]):
            a = AdapterSet(dim, depth, self.adapter_bottleneck)
            prefix = f"adapter{j}."
            a.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                               if k.startswith(prefix)})
            self._add_subspace(a.requires_grad_(False).eval())
        self.prototypes_, self.task_of_ = state["prototypes"], state["task_of"]

    def parameter_counts(self) -> dict[str, int]:
        adapters = sum(count(a) for a in self.adapters_)
        base = count(self.backbone.model)
        return {"trainable": adapters, "total": base + adapters + self.prototypes_.numel()}


def _frozen_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).requires_grad_(False).eval()


def complement(w: torch.Tensor, task_of: torch.Tensor) -> torch.Tensor:
    """Semantic-guided prototype complement: W (C, T, D) with W[c, j] for every class c of an
    old task i and newer subspace j (i < j < T) replaced by S @ W[𝒩, j], where 𝒩 are the
    classes of tasks j..T-1 and S = softmax_row(cos(W[c, i], W[𝒩, i])). Only real prototypes
    (W[c', j] with j <= task of c') are read, so the order of the updates does not matter."""
    w = w.clone()
    for i in range(w.shape[1] - 1):
        old = task_of == i  # (C,)
        for j in range(i + 1, w.shape[1]):
            newer = task_of >= j  # (C,)
            sim = F.normalize(w[old, i], dim=1) @ F.normalize(w[newer, i], dim=1).T  # (o, n)
            w[old, j] = sim.softmax(dim=1) @ w[newer, j]  # (o, D)
    return w


def reweighted_logits(feats: torch.Tensor, w: torch.Tensor, task_of: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """(N, C) EASE scores: cos(φ_i, W[c, i]) + α/t · Σ_{j≠i} cos(φ_j, W[c, j]) for class c of
    task i, with φ = ``feats`` (N, T, D), W (C, T, D) and t = T - 1 (PILOT ``forward_reweight``)."""
    t = w.shape[1] - 1
    cos = torch.einsum("ntd,ctd->nct", F.normalize(feats, dim=-1), F.normalize(w, dim=-1))
    weight = torch.full(w.shape[:2], alpha / max(t, 1))  # (C, T)
    weight[torch.arange(len(w)), task_of] = 1.0
    return (cos * weight).sum(-1)  # (N, C)
