"""APD (Yoon et al., "Scalable and Order-robust Continual Learning with Additive Parameter
Decomposition", ICLR 2020, arXiv 1902.09432; official TF code jaehong31/APD @6b6b67d).

Task-incremental (the task id is given at test time). Every layer's weight for task t is
θ_t = σ ⊗ s(m_t) + τ_t (``retain.layers.apd``); the network is trained from scratch on raw pixels
(backbones ``pixels`` / ``pixels_rgb``). Task t minimises (``build_model``; TF l2_loss = ½‖·‖²)

    CE(head_t) + λ_wd(½‖τ_t‖² + ½‖m_t‖²) [+ λ_wd ½‖σ‖² at t = 0] + λ_1‖τ_t‖₁ + λ_m‖m_t‖₁
    + Σ_{j<t} λ_2 ½‖σ ⊗ s(m_j) + τ_j + τ̃_{g(j)} − θ_j*‖² + λ_1‖τ_j‖₁

with θ_j* snapshotted when task t starts: the retroactive term lets σ move while every old τ_j is
updated to keep θ_j. Trained: σ, τ_0..τ_t, m_t, b_t, head_t (Adam, LR × 0.95 per epoch); frozen:
older masks, biases and heads, and local-shared tensors. After every ``cluster_every`` tasks the
adaptive parts are clustered per layer (k-means, k = k_centroids · (t+1) / cluster_every, started
from a seeded shuffle with the previous centroids first) and consolidated into local-shared
tensors; empty clusters keep their centroid (the official code yields NaN). At test time τ and τ̃
are hard-thresholded at λ_1; checkpoint selection uses the unpruned validation accuracy, as the
code (pitfall 29).

Inputs: the official loaders only divide by 255 (backbone ``pixels_rgb01``; ``pixels_rgb``
standardises with CIFAR-100's mean/std). The official k-means draws a fresh random shuffle of
the tasks for every layer (``tf.random_shuffle`` inside its layer loop):
``kmeans_shuffle="per_layer"``; the default ``"shared"`` uses one seeded order for all layers.

Followed the official code: τ_t starts as a **copy of σ** (``initializer=sw``), so training starts
from θ_t = σ ⊗ s(m_t) + σ and the L1 term then sparsifies τ_t (pitfall 29; the paper's text could
not be checked here, ``tau_init="zeros"`` is the alternative); variance-scaling init of σ, masks,
biases and heads; 20 % of each task's training images held out for picking the best of the last 5
epochs; the Split defaults (λ_1 4e-4, λ_2 100, β 1e-2). Left out: multiplying every gradient by
10 before Adam (Adam is nearly invariant to it); batches are plain permutations (the code cycles
through the data across epochs). Images are decoded correctly, unlike the released CIFAR loader
(pitfall: its reshape scrambles channels), so accuracies differ from the released code's.

Capacity (official "Updated Memory Requirements", ``cifar100_apd_run.py``): ``capacity()`` =
active / base, where active counts the non-zero entries of σ, every pruned τ_j and τ̃_g, every
mask, and the current task's bias and head, and base = one trunk's weights + |head| × (tasks − 1).
``parameter_counts()`` reports both numbers ("active", "capacity_base").

Under torchrun: each global batch is split by ``training.backward_share`` ("loss" mode: the
cross-entropy shared, the weight penalties and the retroactive term weighted by each rank's
share); validation and prediction go through ``predict_batches`` (split, gathered); the pick of
the best epoch and the k-means consolidation are rank 0's, broadcast. No BatchNorm.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..context import Context
from ..datasets.base import Split
from ..distributed import Dist
from ..errors import ConfigError
from ..layers.apd import APDNet, TaskView, kmeans, prune
from ..params import Interval
from ..scenarios.base import Task
from ..training import backward_share, image_inputs, predict_batches
from .base import GROWS, PIXELS, TASK_ID_AT_TEST, Method, Needs, count, register_method


@register_method("apd")
class APD(Method):
    paper = "Yoon et al., ICLR 2020 (arXiv 1902.09432)"
    tags = frozenset({GROWS, TASK_ID_AT_TEST})
    needs = Needs(PIXELS, streams=frozenset({"task"}))  # its own network; task id at test
    constraints = {"epochs": Interval(1, None), "batch_size": Interval(1, None),
                   "lr": Interval(0, None, "neither"), "lr_decay": Interval(0, 1, "right"),
                   "wd": Interval(0, None), "l1": Interval(0, None), "approx": Interval(0, None),
                   "mask_l1": Interval(0, None), "cluster_every": Interval(1, None),
                   "k_centroids": Interval(1, None), "gap": Interval(0, None),
                   "kmeans_iters": Interval(1, None), "val_fraction": Interval(0, 1, "left"),
                   "select_last": Interval(1, None)}

    def __init__(self, backbone, *, conv_channels: tuple[int, ...] = (20, 50),
                 hidden: tuple[int, ...] = (800, 500), epochs: int = 20, batch_size: int = 100,
                 lr: float = 1e-3, lr_decay: float = 0.95, wd: float = 1e-4, l1: float = 4e-4,
                 approx: float = 100.0, mask_l1: float = 0.0, cluster_every: int = 5,
                 k_centroids: int = 2, gap: float = 1e-2, kmeans_iters: int = 100,
                 tau_init: Literal["shared", "zeros"] = "shared", val_fraction: float = 0.2,
                 select_last: int = 5, kmeans_shuffle: Literal["shared", "per_layer"] = "shared"):
        super().__init__(backbone)
        self.conv_channels = conv_channels  # 5×5 conv layers (LeNet: 20, 50); () for an MLP
        self.hidden = hidden  # fully-connected widths (LeNet: 800, 500)
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr  # Adam, times lr_decay after every epoch
        self.lr_decay = lr_decay
        self.wd = wd  # λ_wd on τ_t and m_t (and σ at the first task)
        self.l1 = l1  # λ_1: L1 on every τ, and the test-time pruning threshold
        self.approx = approx  # λ_2: the retroactive term keeping old tasks' weights
        self.mask_l1 = mask_l1  # λ_m: L1 on m_t, and the pruning threshold of s(m)
        self.cluster_every = cluster_every  # consolidate after every this many tasks
        self.k_centroids = k_centroids  # clusters per consolidation round
        self.gap = gap  # β: entries within this spread become local-shared
        self.kmeans_iters = kmeans_iters  # iterations of each k-means consolidation
        self.tau_init = tau_init  # "shared": τ_t ← σ (official code); "zeros"
        self.val_fraction = val_fraction  # held out for checkpoint selection; 0: train on all
        self.select_last = select_last  # pick the best of the last epochs on validation
        self.kmeans_shuffle = kmeans_shuffle  # per_layer: a new initial order per layer (official)
        self.net_: APDNet | None = None
        self.task_classes_: list[tuple[int, ...]] = []

    # -- learning -------------------------------------------------------------------------------
    def _learn(self, task: Task, ctx: Context) -> None:
        self._check(task)
        g = ctx.generator(task.id, 0)
        if self.net_ is None:
            self.net_ = self._build()
            self.net_.reset(g)
        self.net_.add_task(len(task.classes), g, self.tau_init)
        self.net_.to(ctx.device)
        self.task_classes_.append(task.classes)
        train, val = self._holdout(task.train, ctx.generator(task.id, 1))
        self._train(task.id, train, val, ctx, ctx.generator(task.id, 2))
        if (task.id + 1) % self.cluster_every == 0:
            self._consolidate(task.id + 1, ctx.generator(task.id, 3), ctx)
        self.net_.requires_grad_(False)

    def _check(self, task: Task) -> None:
        if task.kind != "task":
            raise ConfigError("apd needs the task id at test time: use a task-incremental "
                              "scenario (TIL-B{m}Inc{n}, Superclass-TIL)")
        if not isinstance(self.backbone.model, nn.Identity):
            raise ConfigError("apd trains its own network on raw pixels: use the backbone "
                              f"'pixels' (or 'pixels_rgb'), not {self.backbone.name!r}")

    def _build(self) -> APDNet:
        pre = self.backbone.preprocess
        return APDNet(pre.channels, pre.size, self.conv_channels, self.hidden)

    def _holdout(self, split: Split, g: torch.Generator) -> tuple[Split, Split | None]:
        """A random ``val_fraction`` of the task's training images, held out (official 80/20)."""
        n_val = int(len(split) * self.val_fraction)
        if n_val == 0:
            return split, None
        perm = torch.randperm(len(split), generator=g).numpy()
        return split.subset(np.sort(perm[n_val:])), split.subset(np.sort(perm[:n_val]))

    def _train(self, t: int, train: Split, val: Split | None, ctx: Context, g: torch.Generator
               ) -> None:
        net, bs = self.net_, self.batch_size
        params = self._trainable(t)
        opt = torch.optim.Adam(params, lr=self.lr)
        anchors = [[layer.weight(j).detach().clone() for j in range(t)] for layer in net.layers]
        y = self._local_labels(t, train.targets)
        best, kept = -1.0, None
        for epoch in range(self.epochs):
            opt.param_groups[0]["lr"] = self.lr * self.lr_decay**epoch
            perm = torch.randperm(len(train), generator=g).numpy()
            for start in range(0, len(train), bs):
                pos = perm[start : start + bs]
                x = self.backbone.preprocess(train, pos)  # (B, C, S, S), the global batch
                opt.zero_grad(set_to_none=True)
                backward_share(lambda x: net(x, t), lambda out, y: F.cross_entropy(out, y)
                               + self._penalty(t, anchors), x, y[pos], ctx, params)
                opt.step()
            if val is not None and epoch >= self.epochs - self.select_last:
                acc = self._accuracy(t, val, ctx)
                if ctx.dist.broadcast_object(acc > best):  # rank 0's pick
                    best, kept = acc, [p.detach().clone() for p in params]
        if kept is not None:
            with torch.no_grad():
                for p, v in zip(params, kept, strict=True):
                    p.copy_(v)
        ctx.dist.same_state(net, g)

    def _trainable(self, t: int) -> list[nn.Parameter]:
        """σ, τ_0..τ_t, m_t, b_t and head_t; everything else frozen."""
        net = self.net_
        net.requires_grad_(False)
        params = [*net.heads[t].parameters()]
        for layer in net.layers:
            params += [layer.shared, *layer.adaptive[: t + 1], layer.masks[t], layer.biases[t]]
        for p in params:
            p.requires_grad_(True)
        return params

    def _penalty(self, t: int, anchors: list[list[torch.Tensor]]) -> torch.Tensor:
        total = torch.zeros((), device=self.net_.layers[0].shared.device)
        for layer, old in zip(self.net_.layers, anchors, strict=True):
            tau, m = layer.adaptive[t], layer.masks[t]
            total = total + self.wd * 0.5 * (tau.pow(2).sum() + m.pow(2).sum())
            total = total + self.l1 * tau.abs().sum() + self.mask_l1 * m.abs().sum()
            if t == 0:
                total = total + self.wd * 0.5 * layer.shared.pow(2).sum()
            for j, anchor in enumerate(old):  # the retroactive term, tasks j < t
                total = total + self.approx * 0.5 * (layer.weight(j) - anchor).pow(2).sum()
                total = total + self.l1 * layer.adaptive[j].abs().sum()
        return total

    @torch.no_grad()
    def _accuracy(self, t: int, split: Split, ctx: Context) -> float:
        logits = predict_batches(TaskView(self.net_, t, None), image_inputs(self.backbone, split),
                                 len(split), ctx)
        y = self._local_labels(t, split.targets)
        return float((logits.argmax(1) == y).float().mean())

    def _local_labels(self, t: int, targets: np.ndarray) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.task_classes_[t])}
        return torch.tensor([index[int(c)] for c in targets], dtype=torch.long)

    @torch.no_grad()
    def _consolidate(self, tasks: int, g: torch.Generator, ctx: Context | None = None) -> None:
        """k-means over each layer's adaptive parts (on rank 0, broadcast), then local-shared
        consolidation."""
        dist = ctx.dist if ctx is not None else Dist()  # (one process without a context)
        k = min(tasks, max(1, int(self.k_centroids * tasks / self.cluster_every)))
        order = torch.randperm(tasks, generator=g)[:k]
        for i, layer in enumerate(self.net_.layers):
            if i and self.kmeans_shuffle == "per_layer":
                order = torch.randperm(tasks, generator=g)[:k]
            points = torch.stack([layer.full_adaptive(j).flatten() for j in range(tasks)])
            init = points[order].clone()  # (k, P)
            if layer.centroids is not None:
                init[: len(layer.centroids)] = layer.centroids.flatten(1).to(init)
            if dist.is_main:
                assign, cent = kmeans(points, init, self.kmeans_iters)
            else:
                assign, cent = torch.zeros(tasks, dtype=torch.long, device=init.device), init
            assign, cent = dist.broadcast_(assign), dist.broadcast_(cent)
            layer.consolidate(tasks, assign, self.gap)
            layer.centroids = cent.view(k, *layer.shape)

    # -- prediction -----------------------------------------------------------------------------
    def _predict(self, split: Split, ctx: Context, task_ids: np.ndarray) -> torch.Tensor:
        """Task t's head (pruned weights) in task t's columns; other columns a large negative."""
        out = torch.full((len(split), self.num_classes_), torch.finfo(torch.float32).min)
        for t in np.unique(task_ids).tolist():
            pos = np.flatnonzero(task_ids == t)
            part = split.subset(pos)
            view = TaskView(self.net_, t, self.l1)
            logits = predict_batches(view, image_inputs(self.backbone, part), len(part), ctx)
            out[torch.from_numpy(pos)[:, None], torch.tensor(self.task_classes_[t])] = logits
        return out

    # -- capacity -------------------------------------------------------------------------------
    def capacity(self) -> float:
        """Active parameters over the official base (see the module docstring)."""
        counts = self.parameter_counts()
        return counts["active"] / counts["capacity_base"]

    def parameter_counts(self) -> dict[str, int]:
        if self.net_ is None:
            return {"trainable": 0, "total": count(self.backbone.model), "active": 0,
                    "capacity_base": 1}
        net, t = self.net_, self.net_.num_tasks - 1
        local = sum(x.numel() for layer in net.layers for x in layer.local)
        dense = count(net) + local
        active = sum(_nonzero(layer.shared) + sum(_nonzero(m) for m in layer.masks)
                     + sum(_nonzero(prune(a, self.l1)) for a in layer.adaptive)
                     + sum(_nonzero(prune(x, self.l1)) for x in layer.local)
                     + _nonzero(layer.biases[t]) for layer in net.layers)
        active += sum(_nonzero(p) for p in net.heads[t].parameters())
        trunk = sum(layer.shared.numel() for layer in net.layers)
        base = trunk + net.heads[t].weight.numel() * t
        return {"trainable": dense, "total": dense + count(self.backbone.model),
                "active": active, "capacity_base": base}

    # -- state ----------------------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        state = {f"net.{k}": v.detach().cpu() for k, v in self.net_.state_dict().items()}
        state["classes"] = torch.tensor([c for cs in self.task_classes_ for c in cs])
        state["sizes"] = torch.tensor([len(cs) for cs in self.task_classes_])
        for i, layer in enumerate(self.net_.layers):
            state[f"group.{i}"] = torch.tensor(layer.group, dtype=torch.long)
            state |= {f"local.{i}.{g}": x.detach().cpu() for g, x in enumerate(layer.local)}
            if layer.centroids is not None:
                state[f"centroids.{i}"] = layer.centroids.detach().cpu()
        return state

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        sizes = state["sizes"].tolist()
        bounds = np.cumsum([0, *sizes])
        flat = state["classes"].tolist()
        self.task_classes_ = [tuple(flat[bounds[i] : bounds[i + 1]]) for i in range(len(sizes))]
        self.net_ = self._build()
        g = torch.Generator().manual_seed(0)  # placeholders, overwritten below
        for n in sizes:
            self.net_.add_task(n, g, self.tau_init)
        self.net_.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        for i, layer in enumerate(self.net_.layers):
            layer.group = state[f"group.{i}"].tolist()
            n_local = sum(k.startswith(f"local.{i}.") for k in state)
            layer.local = [state[f"local.{i}.{g}"] for g in range(n_local)]
            layer.centroids = state.get(f"centroids.{i}")
        self.net_.requires_grad_(False)


def _nonzero(x: torch.Tensor) -> int:
    return int(torch.count_nonzero(x))
