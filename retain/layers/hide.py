"""The pieces of HiDe-Prompt (Wang et al., "Hierarchical Decomposition of Prompt-Based Continual
Learning: Rethinking Obscured Sub-optimality", NeurIPS 2023; official ``thu-ml/HiDe-Prompt``,
``engines/hide_{tii,promtp_wtp_and_tap}_engine.py``, ``vits/hide_prompt_vision_transformer.py``,
``peft/prompt/hide_prompt.py``).

* :class:`ClassCentroids`: the ``multi-centroid`` statistics of a class (``_compute_mean``):
  k-means with K centroids on its features; per cluster the mean and the (population,
  ``np.var``) variance of each dimension. A draw from a cluster is N(μ, diag(σ²) + ε·I); clusters
  whose variance is all zero (singletons) are skipped, as in the official sampler.
* :func:`contrastive_regulariser`: ``orth_loss``: M = [stored centroids; batch features],
  S = M Mᵀ / τ (τ = 0.8), CE(S, I): each row must pick itself, so the prompted features of the
  new task are pushed away from the old classes' centroids and from each other.
* :func:`momentum_mix`: E-prompt t used (and kept) as (1 − m)·P_t + m·mean(P_0..P_{t−1}).
* :class:`TaskInferenceNet`: the TII classifier on frozen features: the official ``MlpMapping``
  (``original_model_mlp_structure=[h]``: x + W₂ GELU(W₁ x), then LayerNorm) and a linear head.
* :func:`align_on_samples`: ``train_task_adaptive_prediction``: per epoch draw ``samples``
  vectors per cluster of every seen class, shuffle, and take as many SGD steps (batches of
  ``samples``) as there are classes of the earlier tasks; cosine over epochs.
* :func:`epoch_lr`: the timm schedulers of the official scripts, stepped after each epoch.
* :class:`HiDeNet`: the frozen ViT copy with one prefix E-prompt per task and the WTP head
  (``vits/hide_prompt_vision_transformer.py``); :class:`TaskView` trains it on one task.

Linear layers are initialised as timm's ViT does (trunc-normal std 0.02, bias 0): the official
heads and MLP are created inside the ViT and are not in its checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..context import Context
from ..training import feature_inputs, fit
from .heads import IncrementalLinear
from .kmeans import kmeans, sq_distances
from .prefix import forward_with_prefix


class ClassCentroids:
    """Per class: K cluster means (C, K, D), variances (C, K, D) float64, sizes (C, K)."""

    def __init__(self, dim: int, n_centroids: int, eps: float = 1e-4):
        self.n_centroids = n_centroids
        self.eps = eps  # ε·I added to every diagonal covariance when sampling
        self.labels = torch.zeros(0, dtype=torch.int64)  # (C,)
        self.means = torch.zeros(0, n_centroids, dim, dtype=torch.float64)  # (C, K, D)
        self.vars = torch.zeros(0, n_centroids, dim, dtype=torch.float64)  # (C, K, D)
        self.counts = torch.zeros(0, n_centroids, dtype=torch.int64)  # (C, K)

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, features: torch.Tensor, targets: torch.Tensor, classes,
            generator: torch.Generator) -> None:
        """Cluster the rows of ``features`` (N, D) of each of ``classes`` (labels ``targets``)."""
        known = set(self.labels.tolist()) & set(classes)
        if known:
            raise ValueError(f"classes {sorted(known)} already have statistics")
        stats = [self.cluster(features[targets == c].double(), generator) for c in classes]
        self.labels = torch.cat([self.labels, torch.tensor(list(classes), dtype=torch.int64)])
        self.means = torch.cat([self.means, torch.stack([s[0] for s in stats])])
        self.vars = torch.cat([self.vars, torch.stack([s[1] for s in stats])])
        self.counts = torch.cat([self.counts, torch.stack([s[2] for s in stats])])

    def cluster(self, x: torch.Tensor, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K, D) means, (K, D) variances and (K,) sizes of the k-means clusters of x (n, D).

        An empty cluster (fewer points than K) keeps its centroid as mean, variance 0."""
        if len(x) == 0:
            raise ValueError("a class without samples has no statistics")
        cent = kmeans(x, self.n_centroids, generator=generator)  # (K, D)
        assign = sq_distances(x, cent).argmin(1)  # (n,)
        means, var = cent.clone(), torch.zeros_like(cent)
        counts = torch.bincount(assign, minlength=self.n_centroids)  # (K,)
        for k in range(self.n_centroids):
            members = x[assign == k]  # (n_k, D)
            if len(members):
                means[k], var[k] = members.mean(0), members.var(0, unbiased=False)
        return means, var, counts

    def centroids(self) -> torch.Tensor:
        """(M, D) float32: the means of the non-empty clusters, class by class."""
        return self.means[self.counts > 0].float()

    def rows(self, classes) -> torch.Tensor:
        where = {int(c): i for i, c in enumerate(self.labels)}
        missing = [c for c in classes if int(c) not in where]
        if missing:
            raise KeyError(f"no statistics for classes {missing}")
        return torch.tensor([where[int(c)] for c in classes], dtype=torch.int64)

    def sample(self, classes, n: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws from N(μ, diag(σ²) + ε·I) per cluster of each of ``classes`` whose
        variance is not all zero: vectors (M·n, D) float32 and labels (M·n,), in order."""
        rows = self.rows(classes)
        labels = torch.tensor(list(classes), dtype=torch.int64)[:, None]  # (C', 1)
        labels = labels.expand(-1, self.n_centroids)  # (C', K)
        keep = self.vars[rows].mean(2) != 0  # (C', K): the official `var.mean() == 0` skip
        mu, var = self.means[rows][keep], self.vars[rows][keep]  # (M, D)
        noise = torch.randn(len(mu), n, mu.shape[1], generator=generator, dtype=torch.float64)
        x = mu[:, None] + (var[:, None] + self.eps).sqrt() * noise  # (M, n, D)
        return x.reshape(-1, mu.shape[1]).float(), labels[keep].repeat_interleave(n)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}labels": self.labels, f"{prefix}means": self.means,
                f"{prefix}vars": self.vars, f"{prefix}counts": self.counts}

    def load(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        self.labels = state[f"{prefix}labels"].long()
        self.means = state[f"{prefix}means"].double()
        self.vars = state[f"{prefix}vars"].double()
        self.counts = state[f"{prefix}counts"].long()


def contrastive_regulariser(features: torch.Tensor, anchors: torch.Tensor,
                            temperature: float = 0.8) -> torch.Tensor:
    """CE(M Mᵀ/τ, I) with M = [anchors (A, D); features (B, D)] (official ``orth_loss``)."""
    m = torch.cat([anchors.to(features), features])  # (A+B, D)
    sim = m @ m.T / temperature  # (A+B, A+B)
    return F.cross_entropy(sim, torch.arange(len(m), device=m.device))


def momentum_mix(current: torch.Tensor, older: torch.Tensor, momentum: float) -> torch.Tensor:
    """(1 − m)·current + m·mean(older) with ``older`` (t, ...) detached (no gradient)."""
    if momentum == 0 or len(older) == 0:
        return current
    return (1 - momentum) * current + momentum * older.detach().mean(0)


def grow_head(head: IncrementalLinear, num_classes: int, generator: torch.Generator) -> None:
    """Expand ``head`` to ``num_classes`` rows; new rows trunc-normal (std 0.02), bias 0."""
    old = head.num_classes
    head.expand(num_classes, generator)
    with torch.no_grad():
        nn.init.trunc_normal_(head.weight[old:], std=0.02, generator=generator)
        head.bias[old:] = 0


class TaskInferenceNet(nn.Module):
    """z = head(LN(x + W₂·GELU(W₁·x))), W₁: D → hD, W₂: hD → D (official ``MlpMapping`` with
    ``mlp_structure=[h]``; dropout 0); ``head`` grows with the classes."""

    def __init__(self, dim: int, hidden: int, generator: torch.Generator | None = None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden * dim), nn.Linear(hidden * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = IncrementalLinear(dim)
        with torch.no_grad():
            for fc in (self.fc1, self.fc2):
                nn.init.trunc_normal_(fc.weight, std=0.02, generator=generator)
                fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x + self.fc2(F.gelu(self.fc1(x))))  # (B, D)
        return self.head(h)  # (B, C)


def align_on_samples(model: nn.Module, stats: ClassCentroids, seen, steps: int, *, epochs: int,
                     lr: float, samples: int, weight_decay: float, generator: torch.Generator,
                     ctx: Context, desc: str = "align") -> None:
    """Train ``model``'s trainable parameters with CE on draws from ``stats``: per epoch,
    ``samples`` per cluster of each ``seen`` class, shuffled, of which ``steps`` batches of
    ``samples`` are used (fewer if there are not that many draws); SGD (momentum 0.9) at
    ``lr``·(1 + cos(π e/epochs))/2 in epoch e."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr * (1 + math.cos(math.pi * epoch / epochs)) / 2
        x, y = stats.sample(seen, samples, generator)  # (M·n, D), (M·n,)
        used = torch.randperm(len(y), generator=generator)[: steps * samples]
        fit(model, feature_inputs(x[used]), y[used], ctx, epochs=1, batch_size=samples,
            generator=generator, optimizer=opt, desc=desc)


def epoch_lr(base: float, epoch: int, epochs: int, schedule: str, *, decay_epochs: int = 30,
             decay_rate: float = 0.1, min_lr: float = 1e-5) -> float:
    """Learning rate of ``epoch`` (0-based) under the official timm schedulers, which are
    stepped after each epoch with its index: epoch e runs at the rate of t = e − 1 (e ≥ 1).
    "step": base·decay_rate^⌊t/decay_epochs⌋; "cosine": min_lr + (base − min_lr)(1 + cos(πt/E))/2.
    """
    t = max(epoch - 1, 0)
    if schedule == "constant" or epoch == 0:
        return base
    if schedule == "step":
        return base * decay_rate ** (t // decay_epochs)
    if schedule == "cosine":
        return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / epochs))
    raise ValueError(f"unknown schedule {schedule!r}")



class HiDeNet(nn.Module):
    """The frozen ViT copy with prefix sites, one E-prompt (K, 2, L, D) per task and the head:
    (images, task per sample) -> (logits, features)."""

    def __init__(self, vit: nn.Module, head: IncrementalLinear, e_layers: tuple[int, ...]):
        super().__init__()
        self.vit, self.head, self.e_layers = vit, head, e_layers
        self.prompts = nn.ParameterList()

    def train(self, mode: bool = True) -> HiDeNet:
        super().train(mode)
        self.vit.eval()  # the frozen ViT never trains (dropout 0 in the reference)
        return self

    def mixed(self, t: int, momentum: float) -> torch.Tensor:
        """(K, 2, L, D): E-prompt t mixed with the mean of the earlier ones (no gradient)."""
        older = list(self.prompts)[:t]
        if not older:
            return self.prompts[t]
        return momentum_mix(self.prompts[t], torch.stack(older), momentum)

    def features(self, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """(B, D) class token of the pass with sample b's prompts[b] (B, K, 2, L, D)."""
        prefixes = {b: prompts[:, i] for i, b in enumerate(self.e_layers)}  # (B, 2, L, D)
        return forward_with_prefix(self.vit, x, prefixes)

    def forward(self, x: torch.Tensor, tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = torch.stack(list(self.prompts))  # (T, K, 2, L, D)
        feats = self.features(x, table[tasks])  # (B, D)
        return self.head(feats), feats  # (B, C), (B, D)


class TaskView(nn.Module):
    """Training view of the net on task t: every sample takes the momentum-mixed E-prompt t."""

    def __init__(self, net: HiDeNet, task: int, momentum: float):
        super().__init__()
        self.net, self.task, self.momentum = net, task, momentum

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.net.mixed(self.task, self.momentum)  # (K, 2, L, D)
        feats = self.net.features(x, p.expand(len(x), -1, -1, -1, -1))  # (B, D)
        return self.net.head(feats), feats


class PromptedFeatures(nn.Module):
    """Images -> (B, D) features with E-prompt t as it is stored (TAP statistics)."""

    def __init__(self, net: HiDeNet, task: int):
        super().__init__()
        self.net, self.task = net, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x, self.net.prompts[self.task].expand(len(x), -1, -1, -1, -1))
