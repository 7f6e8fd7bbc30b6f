"""Per-sample random draws (dropout, stochastic depth) that do not depend on how a batch is
split over processes.

``nn.Dropout`` and timm's ``DropPath`` draw their masks for the rows they are given from torch's
global generator. A rank running rows [a, b) of a global batch of B (``training.backward_share``
with shard="loss") would therefore draw other masks than one process running all B rows.
``RowDropout`` / ``RowDropPath``, once told this rank's rows (``global_rows``, with the ids of
``row_ids`` carried in the batch so that ``batch_share`` splits them with the samples), draw the
masks of the whole global batch — the same numbers, in the same order, as one process — and
keep their rows. Untold, or running every row, they are ``nn.Dropout`` / ``DropPath`` exactly.
On the CPU the drawn masks equal ``F.dropout``'s; CUDA's fused dropout kernel draws others (same
distribution), so there one process and several agree in distribution, not bit for bit.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from timm.layers import DropPath, drop_path
from torch import nn


def row_ids(n: int) -> torch.Tensor:
    """(n, 2) ids of the rows of a global batch of n: (row, n), split with the batch."""
    return torch.stack([torch.arange(n), torch.full((n,), n)], 1)


class RowDropout(nn.Module):
    """``nn.Dropout(p)`` whose mask is drawn for the whole global batch (see the module)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p
        self.rows: tuple[torch.Tensor, int] | None = None  # (this rank's rows, global batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or _whole(self.rows, x):
            return F.dropout(x, self.p, self.training)
        idx, total = self.rows
        keep = 1.0 - self.p
        mask = x.new_empty((total, *x.shape[1:])).bernoulli_(keep)  # (B_global, ...)
        return x * (mask.div_(keep) if keep > 0 else mask)[idx]


class RowDropPath(nn.Module):
    """timm's ``DropPath`` whose per-sample keep draws are those of the global batch."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep
        self.rows: tuple[torch.Tensor, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0 or _whole(self.rows, x):
            return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)
        idx, total = self.rows
        keep = 1.0 - self.drop_prob
        draw = x.new_empty((total,) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B_global, 1, ..)
        if keep > 0 and self.scale_by_keep:
            draw.div_(keep)
        return x * draw[idx]


def _whole(rows: tuple[torch.Tensor, int] | None, x: torch.Tensor) -> bool:
    return rows is None or len(x) == rows[1]


def keyed_draws(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.Dropout`` / ``DropPath`` replaced by its row-keyed twin (no
    parameters or buffers change); returns ``module``."""
    for name, child in module.named_children():
        if type(child) is nn.Dropout:
            setattr(module, name, RowDropout(child.p))
        elif type(child) is DropPath:
            setattr(module, name, RowDropPath(child.drop_prob, child.scale_by_keep))
        else:
            keyed_draws(child)
    return module


class RowKeyed(nn.Module):
    """(inputs..., row ids) -> ``module(*inputs)`` with the draws of the global batch."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *x: torch.Tensor):
        with global_rows(self.module, x[-1]):
            return self.module(*x[:-1])


@contextlib.contextmanager
def global_rows(module: nn.Module, ids: torch.Tensor):
    """While active, the row-keyed draws of ``module`` know that it runs the rows ``ids``
    ((b, 2) rows of ``row_ids(B)``) of a global batch of B."""
    users = [m for m in module.modules() if isinstance(m, RowDropout | RowDropPath)]
    rows = (ids[:, 0], int(ids[0, 1])) if len(ids) else None
    for m in users:
        m.rows = rows
    try:
        yield
    finally:
        for m in users:
            m.rows = None
