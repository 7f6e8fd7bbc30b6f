"""Pieces of ZSCL (Zheng et al., ICCV 2023): distillation loss, L2 to anchor weights, the
running-mean weight ensemble, the warm-up + cosine rate, and the reference-data folder.

Followed: Thunderbeee/ZSCL ``mtil/src/models/helpers.py`` / ``cil/continual_clip/utils.py``
(``distillation``, ``l2_loss``, ``merge_we``, ``cosine_lr``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..datasets.base import Split
from ..errors import ConfigError

CAPTIONS_FILE = "captions.tsv"


def distillation(teacher: torch.Tensor, student: torch.Tensor, T: float = 2.0) -> torch.Tensor:
    """D_T = T^2 * CE(student / T, softmax(teacher / T)), mean over rows: (R, C), (R, C) -> ()."""
    p = F.softmax(teacher / T, dim=1)  # (R, C)
    return F.cross_entropy(student / T, p) * T**2


def weight_l2(module: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """sum_i ||theta_i - anchor_i||^2 over every parameter of ``module`` (official ``l2_loss``)."""
    pairs = zip(module.parameters(), anchor, strict=True)
    return sum(((p - a.detach()) ** 2).sum() for p, a in pairs)


@torch.no_grad()
def merge_running_mean(model: nn.Module, ensemble: nn.Module, n: int) -> None:
    """theta_WE <- (n * theta_WE + theta) / (n + 1), in place on ``ensemble``'s parameters."""
    for p, q in zip(model.parameters(), ensemble.parameters(), strict=True):
        q.mul_(n).add_(p.detach()).div_(n + 1)


def warmup_cosine(warmup: int, steps: int):
    """Rate factor of step s: (s+1)/warmup while s < warmup, then cosine from 1 to 0 (official
    ``cosine_lr``; the cosine spans ``steps - warmup`` steps, at least 1)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def read_reference(root: str | Path) -> tuple[Split, list[str]]:
    """The reference folder: ``root/captions.tsv``, one ``relative/image/path<TAB>caption`` per
    line (UTF-8; empty lines and lines starting with '#' are skipped). Returns the images (a
    Split of file paths, labels 0) and the distinct captions in file order. Images and captions
    need not describe each other: the official code pairs ImageNet images with Conceptual
    Captions sentences."""
    root = Path(root)
    file = root / CAPTIONS_FILE
    if not root.is_dir() or not file.is_file():
        raise ConfigError(
            f"zscl reference data not found: expected a folder with {CAPTIONS_FILE} at {root!s}; "
            f"each line 'relative/image/path<TAB>caption'. Set reference_root=<folder>, or "
            f"reference='current' (the current task's images; not the paper's setting)")
    paths, captions = [], []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" not in line:
            raise ConfigError(f"{file}:{n}: expected 'image_path<TAB>caption', got {line!r}")
        rel, caption = line.split("\t", 1)
        path = root / rel.strip()
        if not path.is_file():
            raise ConfigError(f"{file}:{n}: image {path} does not exist")
        paths.append(str(path))
        captions.append(caption.strip())
    if not paths:
        raise ConfigError(f"{file} lists no images")
    data = np.array(paths, dtype=object)
    return Split(data, np.zeros(len(paths), np.int64)), list(dict.fromkeys(captions))
