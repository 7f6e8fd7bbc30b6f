"""Additive parameter decomposition (APD; Yoon et al., ICLR 2020; official ``cifar100_apd.py``).

The weight of layer l for task t is θ_t = σ ⊗ s(m_t) + τ_t (+ τ̃_g): a shared σ, a per-output
mask m_t through a sigmoid (broadcast over inputs and kernel), a sparse task-adaptive τ_t of σ's
shape and, once tasks are consolidated, the local-shared τ̃_g of the task's cluster g. At test
time τ_t and τ̃_g are hard-thresholded at λ_1 (``l1_pruning``). ``APDNet`` is the official
LeNet-like network (conv 5×5 SAME → ReLU → LRN → max-pool 3/2 SAME per conv layer, then ReLU
fully-connected layers) with one linear head per task; no conv layers gives an MLP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def variance_scaling_(t: torch.Tensor, fan_in: int, g: torch.Generator) -> torch.Tensor:
    """TF1's ``variance_scaling_initializer()``: truncated normal (±2σ), var 1 / fan_in."""
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # the truncation's std correction
    with torch.no_grad():
        return nn.init.trunc_normal_(t, 0.0, std, -2 * std, 2 * std, generator=g)


def prune(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Hard threshold: keep entries with |x| > threshold (official ``l1_pruning``)."""
    return x * (x.abs() > threshold)


class DecomposedLayer(nn.Module):
    """One layer's shared σ and, per task, mask m_t, adaptive τ_t and bias b_t.

    ``shape`` is (out, in) for a linear layer, (out, in, k, k) for a convolution. ``group[t]``
    is the index of task t's local-shared tensor in ``local`` (not trained), or -1.
    """

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)
        self.shared = nn.Parameter(torch.zeros(shape))  # σ
        self.masks = nn.ParameterList()  # m_t (out,)
        self.adaptive = nn.ParameterList()  # τ_t, σ's shape
        self.biases = nn.ParameterList()  # b_t (out,)
        self.local: list[torch.Tensor] = []  # τ̃_g, σ's shape
        self.group: list[int] = []  # per task
        self.centroids: torch.Tensor | None = None  # (k, *shape) of the last k-means

    def _apply(self, fn, recurse=True):
        """``.to(device)`` and friends also move the (unregistered) local-shared tensors."""
        super()._apply(fn, recurse)
        self.local = [fn(x) for x in self.local]
        self.centroids = None if self.centroids is None else fn(self.centroids)
        return self

    @property
    def fan_in(self) -> int:
        return math.prod(self.shape[1:])

    def reset_shared(self, g: torch.Generator) -> None:
        variance_scaling_(self.shared, self.fan_in, g)

    def add_task(self, g: torch.Generator, tau_init: str = "shared") -> None:
        """m_t and b_t variance-scaled (TF reads a vector's fan-in as its length); τ_t a copy of
        σ (official ``initializer=sw``) or zeros."""
        out = self.shape[0]
        self.masks.append(nn.Parameter(variance_scaling_(torch.empty(out), out, g)))
        self.biases.append(nn.Parameter(variance_scaling_(torch.empty(out), out, g)))
        tau = self.shared.detach().clone() if tau_init == "shared" else torch.zeros(self.shape)
        self.adaptive.append(nn.Parameter(tau))
        self.group.append(-1)

    def _mask(self, t: int) -> torch.Tensor:
        m = torch.sigmoid(self.masks[t])  # (out,)
        return m.view(-1, *[1] * (len(self.shape) - 1))  # broadcast over inputs (and kernel)

    def full_adaptive(self, t: int) -> torch.Tensor:
        """τ_t + τ̃_{g(t)}: the task's whole adaptive part."""
        g = self.group[t]
        return self.adaptive[t] if g < 0 else self.adaptive[t] + self.local[g]

    def weight(self, t: int, threshold: float | None = None, mask_threshold: float = 0.0
               ) -> torch.Tensor:
        """θ_t; with ``threshold`` the test-time weight σ ⊗ P(s(m_t)) + P(τ_t) + P(τ̃_g)."""
        if threshold is None:
            return self.shared * self._mask(t) + self.full_adaptive(t)
        w = self.shared * prune(self._mask(t), mask_threshold) + prune(self.adaptive[t], threshold)
        g = self.group[t]
        return w if g < 0 else w + prune(self.local[g], threshold)

    def forward(self, x: torch.Tensor, t: int, threshold: float | None = None) -> torch.Tensor:
        w, b = self.weight(t, threshold), self.biases[t]
        if len(self.shape) == 2:
            return F.relu(F.linear(x.flatten(1), w, b))  # (B, out)
        return conv_block(x, w, b)  # (B, out, ⌈H/2⌉, ⌈W/2⌉)

    @torch.no_grad()
    def consolidate(self, tasks: int, assign: torch.Tensor, gap: float) -> None:
        """Hierarchical knowledge consolidation (``aw_consolidation``) of tasks 0..tasks-1.

        In a cluster of two or more tasks, entries whose spread max − min is at most ``gap``
        become local-shared with value (max + min) / 2 and are zeroed in each member's τ; a
        singleton gets its whole adaptive part back. Former local-shared tensors are dropped.
        """
        full = torch.stack([self.full_adaptive(j) for j in range(tasks)])  # (T, *shape)
        local, group = [], [-1] * tasks
        for c in assign.unique().tolist():
            members = torch.nonzero(assign == c).flatten().tolist()
            if len(members) == 1:
                self.adaptive[members[0]].copy_(full[members[0]])
                continue
            hi, lo = full[members].amax(0), full[members].amin(0)
            shared = (hi - lo) <= gap
            local.append((hi + lo) / 2 * shared)
            for j in members:
                self.adaptive[j].copy_(full[j] * ~shared)
                group[j] = len(local) - 1
        self.local = local
        self.group = group + self.group[tasks:]


def kmeans(points: torch.Tensor, centroids: torch.Tensor, iters: int = 100
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from the given initial ``centroids`` (k, P) on ``points`` (T, P).

    Returns (assignment (T,), centroids (k, P)). A cluster left empty keeps its centroid (the
    official code takes the mean of an empty gather: NaN). Stops early once the assignment no
    longer changes, which gives the same result as running all ``iters`` iterations.
    """
    cent = centroids.clone()
    assign = None
    for _ in range(iters):
        dist = torch.stack([(points - c).pow(2).sum(1) for c in cent], dim=1)  # (T, k)
        new = dist.argmin(1)  # (T,) first minimum on ties
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for c in range(len(cent)):
            members = assign == c
            if members.any():
                cent[c] = points[members].mean(0)
    return assign, cent


def conv_block(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """conv SAME → ReLU → LRN(radius 4, α 0.001/9, β 0.75, bias 1) → max-pool 3×3/2 SAME."""
    x = F.relu(F.conv2d(x, w, b, padding=w.shape[-1] // 2))  # (B, out, H, W)
    x = F.local_response_norm(x, size=9, alpha=0.001, beta=0.75, k=1.0)  # α / size = 0.001 / 9
    return max_pool_same(x)


def max_pool_same(x: torch.Tensor, k: int = 3, s: int = 2) -> torch.Tensor:
    """TF's max_pool(ksize k, stride s, 'SAME'): output ⌈H/s⌉, extra padding right/bottom."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=float("-inf")), k, s)


class APDNet(nn.Module):
    """Decomposed conv layers then decomposed fully-connected layers, one head per task."""

    def __init__(self, in_channels: int, size: int, conv_channels: tuple[int, ...],
                 hidden: tuple[int, ...], kernel: int = 5):
        super().__init__()
        layers, c = [], in_channels
        for out in conv_channels:
            layers.append(DecomposedLayer((out, c, kernel, kernel)))
            c, size = out, math.ceil(size / 2)
        width = c * size * size
        for out in hidden:
            layers.append(DecomposedLayer((out, width)))
            width = out
        self.layers = nn.ModuleList(layers)
        self.width = width
        self.heads = nn.ModuleList()

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def reset(self, g: torch.Generator) -> None:
        for layer in self.layers:
            layer.reset_shared(g)

    def add_task(self, num_classes: int, g: torch.Generator, tau_init: str = "shared") -> None:
        for layer in self.layers:
            layer.add_task(g, tau_init)
        head = nn.Linear(self.width, num_classes)
        variance_scaling_(head.weight, self.width, g)
        variance_scaling_(head.bias, num_classes, g)
        self.heads.append(head)

    def forward(self, x: torch.Tensor, t: int, threshold: float | None = None) -> torch.Tensor:
        """Logits of task t's head (B, |C_t|); ``threshold`` = λ_1 prunes τ as at test time."""
        for layer in self.layers:
            x = layer(x, t, threshold)
        return self.heads[t](x)


class TaskView(nn.Module):
    """``net`` fixed to one task (and pruning threshold): x -> logits, for batch prediction."""

    def __init__(self, net: APDNet, t: int, threshold: float | None):
        super().__init__()
        self.net, self.t, self.threshold = net, t, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.t, self.threshold)
