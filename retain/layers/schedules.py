"""Learning-rate schedules that change once per epoch but are stepped after every batch (the way
``retain.training.fit`` steps a scheduler): the step count is turned back into an epoch index.

``warmup_cosine`` is timm's per-epoch ``CosineLRScheduler`` with a linear warm-up (APG);
``epoch_cosine`` is torch's ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped once per epoch
(LayUP's ``main.py``), i.e. the same law with no warm-up and a floor of 0.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int, *,
                  warmup_epochs: int, warmup_lr: float, min_lr: float
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """timm's per-epoch ``CosineLRScheduler`` (no warm-up prefix), stepped every batch: epoch
    e < W runs at warmup_lr + e·(lr − warmup_lr)/W, later ones at
    min_lr + ½(lr − min_lr)(1 + cos(π e / E)); each group scales by its own base rate."""
    base = optimizer.param_groups[0]["lr"]

    def factor(step: int) -> float:
        e = step // max(1, steps_per_epoch)
        if e < warmup_epochs:
            lr = warmup_lr + e * (base - warmup_lr) / warmup_epochs
        else:
            lr = min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * e / max(1, epochs)))
        return lr / base

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_cosine(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int
                 ) -> torch.optim.lr_scheduler.LambdaLR:
    """Every batch of epoch e (0-based) at lr·½(1 + cos(π e / E)): the whole first epoch at the
    full rate, as ``CosineAnnealingLR(T_max=E)`` with ``scheduler.step()`` after each epoch."""
    return warmup_cosine(optimizer, epochs, steps_per_epoch, warmup_epochs=0,
                         warmup_lr=optimizer.param_groups[0]["lr"], min_lr=0.0)
