"""CODA-Prompt's decomposed, attention-weighted prompt (Smith et al., "CODA-Prompt: COntinual
Decomposed Attention-based Prompting for Rehearsal-Free Continual Learning", CVPR 2023; official
GT-RIPL/CODA-Prompt ``models/zoo.py::CodaPrompt``, LAMDA-PILOT ``backbone/prompt.py::CodaPrompt``).

In each prompted block a pool of M components P_m (L × D), keys K_m and attention vectors A_m
(each of the query's width) composes, for a query q (the frozen ViT's feature of the image),

    α_m = cos(q ⊙ A_m, K_m)        (no softmax)
    P(q) = Σ_m α_m P_m             (L × D)

Task t owns the slice ``[t·M/T, (t+1)·M/T)`` of every pool. Before the task the slice is drawn by
Gram–Schmidt: random normal vectors orthogonalised against every earlier component (and each
other) and unit-normalised, separately for P (flattened to L·D), K and A (the official code's
``gram_schmidt``). While task t trains, the slices of earlier tasks enter the composition
detached, and later slices do not enter at all; at test time all learned slices compose.

Deviation: the official ``gram_schmidt`` subtracts the projections on each earlier component
separately, which is exact only while those are mutually orthogonal (true at initialisation,
no longer after training); here the new slice is orthogonalised against the span of all earlier
components (a QR decomposition with the signs that make it classical Gram–Schmidt), so it is
exactly orthogonal to them whether or not they were trained.
"""

from __future__ import annotations

import torch
from torch import nn


def orthonormal_extension(old: torch.Tensor, new: int,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """(new, n) unit rows orthogonal to each other and to every row of ``old`` (s, n):
    Gram–Schmidt of random normal vectors against ``old``'s rows, then against each other."""
    s, n = old.shape
    if s + new > n:
        raise ValueError(f"cannot draw {new} vectors orthogonal to {s} others in {n} dimensions")
    v = torch.randn(new, n, generator=generator, dtype=torch.float64)  # (new, n)
    q, r = torch.linalg.qr(torch.cat([old.detach().cpu().double(), v]).T)  # (n, s+new)
    sign = torch.sign(torch.diagonal(r)[s:])  # Householder signs -> Gram–Schmidt's (+)
    return (q[:, s:] * torch.where(sign == 0, 1.0, sign)).T.to(old)  # (new, n)


def composition_weights(q: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor
                        ) -> torch.Tensor:
    """α (B, M) with α_bm = cos(q_b ⊙ A_m, K_m); q (B, Dk), keys and attention (M, Dk).
    Written as three matrix products, so no (B, M, Dk) tensor is formed."""
    dot = q @ (attention * keys).T  # (B, M) Σ_d q_d A_md K_md
    aq_norm = ((q * q) @ (attention * attention).T).clamp_min(1e-24).sqrt()  # (B, M) ‖q ⊙ A_m‖
    k_norm = keys.norm(dim=1).clamp_min(1e-12)  # (M,)
    return dot / (aq_norm.clamp_min(1e-12) * k_norm)  # (B, M)


def ortho_penalty(t: torch.Tensor) -> torch.Tensor:
    """mean((T Tᵀ − I)²) over the rows of t (m, n) (the official ``ortho_penalty``)."""
    eye = torch.eye(t.shape[0], dtype=t.dtype, device=t.device)
    return ((t @ t.T - eye) ** 2).mean()


class ComponentPool(nn.Module):
    """The components (n, M, L, D), keys (n, M, Dk) and attention vectors (n, M, Dk) of ``n``
    prompted blocks. Slices are drawn with :meth:`initialise`; a call composes the prompt of every
    block from the components ``[0, stop)``, those before ``start`` detached."""

    def __init__(self, layers: int, size: int, length: int, dim: int, key_dim: int):
        super().__init__()
        self.components = nn.Parameter(torch.zeros(layers, size, length, dim))  # (n, M, L, D)
        self.keys = nn.Parameter(torch.zeros(layers, size, key_dim))  # (n, M, Dk)
        self.attention = nn.Parameter(torch.zeros(layers, size, key_dim))  # (n, M, Dk)

    @property
    def size(self) -> int:
        return self.keys.shape[1]

    @torch.no_grad()
    def initialise(self, start: int, stop: int, generator: torch.Generator | None = None) -> None:
        """Draw the slice ``[start, stop)`` of every pool by Gram–Schmidt against ``[0, start)``."""
        for t in (self.components, self.keys, self.attention):
            for layer in t:  # (M, ...)
                flat = layer.flatten(1)  # (M, n) a view
                flat[start:stop] = orthonormal_extension(flat[:start], stop - start, generator)

    def active(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(components (n, f, L, D), keys (n, f, Dk), attention (n, f, Dk)) with f = ``stop``:
        rows before ``start`` detached (frozen), rows from ``stop`` on left out."""
        return tuple(torch.cat([t[:, :start].detach(), t[:, start:stop]], dim=1)
                     for t in (self.components, self.keys, self.attention))

    def forward(self, q: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """(n, B, L, D): the prompt Σ_m α_m P_m of every block for the queries q (B, Dk)."""
        p, k, a = self.active(start, stop)
        alpha = torch.stack([composition_weights(q, ki, ai) for ki, ai in zip(k, a, strict=True)])
        # alpha: (n, B, f)
        return torch.einsum("nbm,nmld->nbld", alpha, p)  # (n, B, L, D)

    def ortho_loss(self, start: int, stop: int) -> torch.Tensor:
        """Σ over blocks of the orthogonality penalties of K, A and P (flattened), on the
        components ``[0, stop)`` (earlier ones detached), as the official code sums them."""
        p, k, a = self.active(start, stop)
        return sum(ortho_penalty(k[i]) + ortho_penalty(a[i]) + ortho_penalty(p[i].flatten(1))
                   for i in range(len(k)))
