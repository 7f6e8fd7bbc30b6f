"""Seeded k-means: k-means++ seeding, Lloyd iterations, the best of ``n_init`` runs.

S-Prompts (Wang et al., NeurIPS 2022) summarises each domain by K centroids of its frozen
features (the official code calls ``sklearn.cluster.KMeans(n_clusters=5, random_state=0)``).
This version draws every random choice from a torch generator and computes distances in float64
by a fixed formula, so the centroids are a deterministic function of (points, k, generator).
Deviation from scikit-learn: plain k-means++ (one candidate per step, not the greedy variant with
2 + log k candidates), so centroids need not match sklearn's bit for bit.
"""

from __future__ import annotations

import torch


def sq_distances(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, D), (K, D) -> (N, K) squared Euclidean distances (clamped at 0)."""
    cross = points @ centroids.T  # (N, K)
    d = points.pow(2).sum(1, keepdim=True) - 2 * cross + centroids.pow(2).sum(1)  # (N, K)
    return d.clamp_min(0)


def kmeans_plusplus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """(k, D) initial centroids: the first uniformly, each next one with probability
    proportional to its squared distance to the nearest centroid chosen so far (Arthur &
    Vassilvitskii, 2007); uniformly again where every point is already a centroid."""
    n = len(points)
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = sq_distances(points, points[chosen]).squeeze(1)  # (N,)
    for _ in range(1, k):
        weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest = torch.minimum(nearest, sq_distances(points, points[chosen[-1:]]).squeeze(1))
    return points[chosen].clone()  # (k, D)


def lloyd(points: torch.Tensor, centroids: torch.Tensor, iters: int = 300
          ) -> tuple[torch.Tensor, float]:
    """Lloyd's iterations from ``centroids`` (k, D) until the assignment stops changing.

    Returns (centroids (k, D), inertia = sum of squared distances to the nearest centroid). An
    empty cluster keeps its centroid.
    """
    cent, assign = centroids.clone(), None
    for _ in range(iters):
        new = sq_distances(points, cent).argmin(1)  # (N,) first minimum on ties
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for c in range(len(cent)):
            members = points[assign == c]  # (n_c, D)
            if len(members):
                cent[c] = members.mean(0)
    inertia = float(sq_distances(points, cent).min(1).values.sum())
    return cent, inertia


def kmeans(points: torch.Tensor, k: int, *, generator: torch.Generator, n_init: int = 10,
           iters: int = 300) -> torch.Tensor:
    """(k, D) centroids of ``points`` (N, D): the lowest-inertia of ``n_init`` seeded runs.

    With fewer than ``k`` points the centroids are the points, repeated to ``k`` rows (repeats
    change no nearest-centroid distance).
    """
    if k < 1 or n_init < 1:
        raise ValueError(f"kmeans needs k >= 1 and n_init >= 1, got k={k}, n_init={n_init}")
    if len(points) == 0:
        raise ValueError("kmeans needs at least one point")
    x = points.detach().double()  # (N, D)
    if len(x) <= k:
        return x[torch.arange(k) % len(x)].to(points.dtype)  # (k, D)
    best, best_inertia = None, float("inf")
    for _ in range(n_init):
        cent, inertia = lloyd(x, kmeans_plusplus(x, k, generator), iters)
        if inertia < best_inertia:
            best, best_inertia = cent, inertia
    return best.to(points.dtype)  # (k, D)
