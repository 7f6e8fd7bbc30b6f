"""Per-class Gaussian statistics of features, and seeded sampling from them.

Classifier alignment (SLCA, Zhang et al., ICCV 2023) replaces the stored images of old classes
by a Gaussian per class: the mean μ_c and the full covariance Σ_c of its training features, taken
once when the class is learned. Heads are then re-trained on vectors drawn from N(s·μ_c, Σ_c).
APG's centre library (Tang et al., ICCV 2023; ``retain.layers.apg.CenterLibrary``) keeps two
per class, of its intermediate class token and of its prompted feature (HiDe-Prompt's
multi-centroid diagonal statistics are ``retain.layers.hide.ClassCentroids``). Statistics are
float64 (as ``torch.cov`` in the official code) with ε·I added to Σ_c, so it stays positive
definite when a class has fewer samples than feature dimensions (``reg="all_entries"`` adds ε to
every entry instead, ε·11ᵀ, as APG's code does outside CIFAR-100/ImageNet-R: that keeps Σ_c
singular when a class has fewer samples than dimensions, and sampling then fails). A draw is
μ' + ε Lᵀ with ε ~ N(0, I) from the caller's generator and L the Cholesky factor of Σ_c
(computed in float64; draws are float32, as the official ``MultivariateNormal(μ.float(),
Σ.float())``): the same law, but seeded. ``sampler`` factorises once for repeated draws (its
factors are half the size of the covariances) and can be moved to an accelerator, where the
seeded noise drawn on the CPU is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError

Regulariser = Literal["identity", "all_entries"]


class ClassGaussians:
    """Mean (C, D) and covariance (C, D, D), float64, of every class added so far."""

    def __init__(self, dim: int, eps: float = 1e-4, reg: Regulariser = "identity"):
        self.eps, self.reg = eps, reg
        self.labels = torch.zeros(0, dtype=torch.int64)  # (C,) class label of each row
        self.means = torch.zeros(0, dim, dtype=torch.float64)  # (C, D)
        self.covs = torch.zeros(0, dim, dim, dtype=torch.float64)  # (C, D, D)

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, features: torch.Tensor, targets: torch.Tensor, classes) -> None:
        """Statistics of each of ``classes`` from ``features`` (N, D) with labels ``targets``."""
        known = set(self.labels.tolist()) & set(classes)
        if known:
            raise ValueError(f"classes {sorted(known)} already have statistics")
        stats = [self._stats(features[targets == c], c) for c in classes]
        self.labels = torch.cat([self.labels, torch.tensor(list(classes), dtype=torch.int64)])
        self.means = torch.cat([self.means, torch.stack([m for m, _ in stats])])
        self.covs = torch.cat([self.covs, torch.stack([s for _, s in stats])])

    def _stats(self, x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) < 2:
            raise ValueError(f"class {c} has {len(x)} sample(s); a covariance needs 2")
        x = x.double()  # (n, D)
        d = x.shape[1]
        reg = (torch.eye(d, dtype=torch.float64) if self.reg == "identity" else
               torch.ones(d, d, dtype=torch.float64))  # (D, D) I or 11ᵀ
        return x.mean(0), torch.cov(x.T) + self.eps * reg  # (D,), (D, D) unbiased

    def rows(self, classes) -> torch.Tensor:
        """Row of each of ``classes`` in ``means``/``covs``."""
        where = {int(c): i for i, c in enumerate(self.labels)}
        missing = [c for c in classes if int(c) not in where]
        if missing:
            raise KeyError(f"no statistics for classes {missing}")
        return torch.tensor([where[int(c)] for c in classes])

    def sampler(self, classes, scales: torch.Tensor | None = None) -> GaussianSampler:
        """Draws from N(s_c·μ_c, Σ_c) for each of ``classes`` (``scales`` (K,) default to 1),
        with every Σ_c factorised once for all the draws that follow."""
        rows = self.rows(classes)
        scales = torch.ones(len(rows)) if scales is None else scales
        means = scales.double().unsqueeze(1) * self.means[rows]  # (K, D)
        factors, info = torch.linalg.cholesky_ex(self.covs[rows])  # (K, D, D) lower triangular
        if bool(info.any()):
            bad = [int(c) for c, i in zip(classes, info.tolist(), strict=True) if i]
            raise ConfigError(f"the covariances of classes {bad[:5]} are not positive definite "
                             f"(ε={self.eps}, reg={self.reg!r}): use reg='identity' or a larger "
                             f"ε, or more samples per class than feature dimensions")
        labels = torch.tensor(list(classes), dtype=torch.int64)
        return GaussianSampler(means.float(), factors.float(), labels)

    def sample(self, classes, n: int, generator: torch.Generator,
               scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws per class from N(s_c·μ_c, Σ_c): see ``GaussianSampler``."""
        return self.sampler(classes, scales)(n, generator)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}labels": self.labels, f"{prefix}means": self.means,
               f"{prefix}covs": self.covs,
               f"{prefix}eps": torch.tensor(self.eps, dtype=torch.float64)}
        if self.reg == "all_entries":  # absent for ε·I (the states written before the option)
            out[f"{prefix}all_entries"] = torch.tensor(True)
        return out

    def load(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        self.labels = state[f"{prefix}labels"].long()
        self.means = state[f"{prefix}means"].double()
        self.covs = state[f"{prefix}covs"].double()
        self.eps = float(state[f"{prefix}eps"])
        self.reg = "all_entries" if f"{prefix}all_entries" in state else "identity"


@dataclass(frozen=True)
class GaussianSampler:
    """K fixed Gaussians N(μ_k, L_k L_kᵀ); ``sampler(n, generator)`` draws n vectors from each."""

    means: torch.Tensor  # (K, D) float32
    factors: torch.Tensor  # (K, D, D) float32, lower Cholesky factors of the covariances
    labels: torch.Tensor  # (K,) int64

    def to(self, device: torch.device | str) -> GaussianSampler:
        """The same Gaussians with means, factors and labels on ``device`` (draws still come
        from the caller's CPU generator)."""
        return GaussianSampler(self.means.to(device), self.factors.to(device),
                               self.labels.to(device))

    def __call__(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors (K·n, D) float32 and their labels (K·n,), class by class, on the device of
        ``means``; the noise is drawn on the CPU from ``generator``."""
        k, d = self.means.shape
        eps = torch.randn(k, n, d, generator=generator).to(self.means.device)  # (K, n, D)
        x = self.means.unsqueeze(1) + eps @ self.factors.transpose(1, 2)  # (K, n, D)
        return x.reshape(k * n, d), self.labels.repeat_interleave(n)
