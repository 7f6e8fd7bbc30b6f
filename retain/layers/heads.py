"""Classifier heads that grow with the classes: cosine/prototype and linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineHead(nn.Module):
    """z_c = σ · <x/‖x‖, w_c/‖w_c‖> (PILOT ``CosineLinear``; Hou et al., LUCIR, CVPR 2019).

    Prototype methods write class means into ``weight``; the argmax does not depend on σ. σ starts
    at ``sigma`` and is learned if ``learn_sigma`` (LayUP's first-session head: 30, fixed).
    """

    def __init__(self, dim: int, num_classes: int = 0, learn_sigma: bool = True,
                 sigma: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_classes, dim))  # (C, D)
        self.sigma = nn.Parameter(torch.full((1,), sigma), requires_grad=learn_sigma)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def append(self, rows: torch.Tensor) -> None:
        """Add classes whose weight vectors (e.g. prototypes) are ``rows`` (k, D)."""
        grown = torch.cat([self.weight.data, rows.to(self.weight)])  # (C+k, D)
        self.weight = nn.Parameter(grown, requires_grad=self.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.weight, dim=1)  # (C, D)
        return self.sigma * F.normalize(x, dim=1) @ w.T  # (B, C)


class IncrementalLinear(nn.Module):
    """A linear head over every class seen so far; ``expand`` keeps the old rows.

    New rows get nn.Linear's initialisation (``init="linear"``: weight and bias ~ U(±1/√D)), or
    timm's ViT head initialisation (``"timm"``: weight ~ N(0, 0.02²), timm's
    ``trunc_normal_(std=.02)`` whose bounds ±2 lie 100 σ out, bias 0), which L2P and DualPrompt
    inherit from their timm-based ViTs (l2p-pytorch, LAMDA-PILOT ``backbone/vit_l2p.py``,
    ``vit_dualprompt.py``: ``init_weights_vit_timm``).
    """

    def __init__(self, dim: int, num_classes: int = 0, *, init: str = "linear"):
        super().__init__()
        if init not in ("linear", "timm"):
            raise ValueError(f"init must be 'linear' or 'timm', got {init!r}")
        self.init = init
        self.weight = nn.Parameter(torch.zeros(num_classes, dim))  # (C, D)
        self.bias = nn.Parameter(torch.zeros(num_classes))  # (C,)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def expand(self, num_classes: int, generator: torch.Generator | None = None) -> None:
        """Grow to ``num_classes`` outputs; new rows initialised as ``init`` says."""
        new = num_classes - self.num_classes
        if new <= 0:
            return
        w, b = torch.empty(new, self.weight.shape[1]), torch.zeros(new)  # (new, D), (new,)
        if self.init == "timm":
            w.normal_(0.0, 0.02, generator=generator)
        else:
            bound = 1.0 / self.weight.shape[1] ** 0.5
            w.uniform_(-bound, bound, generator=generator)
            b.uniform_(-bound, bound, generator=generator)
        self.weight = nn.Parameter(torch.cat([self.weight.data, w.to(self.weight)]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, b.to(self.bias)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # (B, C)


def class_means(features: torch.Tensor, targets: torch.Tensor, classes: list[int] | tuple[int, ...]
                ) -> torch.Tensor:
    """(len(classes), D) mean feature of each class (the prototypes of SimpleCIL / NCM)."""
    rows = []
    for c in classes:
        mask = targets == c
        if not mask.any():
            raise ValueError(f"class {c} has no training sample")
        rows.append(features[mask].mean(0))
    return torch.stack(rows)
