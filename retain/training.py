"""The one epoch loop, and the classifier training/prediction shared by the baselines.

``fit`` is an explicit loop (nanoGPT style): SGD with momentum and a cosine schedule to 0, as
LAMDA-PILOT's learners use; the caller supplies how a batch of positions becomes an input.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .backbones import Backbone
from .context import Context
from .datasets.base import Split

Inputs = Callable[[np.ndarray], torch.Tensor]


def fit(model: nn.Module, inputs: Inputs, targets: torch.Tensor, ctx: Context, *, epochs: int,
        lr: float | None = None, batch_size: int, weight_decay: float = 0.0,
        momentum: float = 0.9, generator: torch.Generator, loss_fn: Callable | None = None,
        desc: str = "train", optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> list[float]:
    """Train ``model``'s trainable parameters; returns the mean loss of each epoch.

    Give ``lr`` (SGD over the trainable parameters, cosine to 0 over every step), or your own
    ``optimizer`` (e.g. parameter groups with their own learning rates; ``weight_decay`` and
    ``momentum`` are then its own) with an optional ``scheduler`` stepped after every batch
    (None: constant rates).
    """
    loss_fn = loss_fn or F.cross_entropy
    n = len(targets)
    opt, sched = _optimizer(model, epochs * math.ceil(n / batch_size), lr, weight_decay,
                            momentum, optimizer, scheduler)
    model.to(ctx.device).train()
    losses = []
    for _ in tqdm(range(epochs), desc=desc, disable=not ctx.progress, leave=False):
        perm = torch.randperm(n, generator=generator).numpy()
        total = 0.0
        for start in range(0, n, batch_size):
            pos = perm[start : start + batch_size]
            x, y = inputs(pos).to(ctx.device), targets[pos].to(ctx.device)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += float(loss.detach()) * len(pos)
        losses.append(total / n)
    model.eval()
    return losses


def _optimizer(model, steps, lr, weight_decay, momentum, optimizer, scheduler):
    """The caller's (optimizer, scheduler), or SGD + cosine over ``steps`` at ``lr``."""
    if (lr is None) == (optimizer is None):
        raise ValueError("fit needs exactly one of lr (default SGD + cosine) or optimizer")
    if optimizer is not None:
        return optimizer, scheduler
    if scheduler is not None:
        raise ValueError("fit: a scheduler needs its optimizer")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)


def image_inputs(backbone: Backbone, split: Split) -> Inputs:
    """Positions -> preprocessed images of ``split`` (B, 3, S, S)."""
    return lambda pos: backbone.preprocess(split, pos)


def feature_inputs(features: torch.Tensor) -> Inputs:
    """Positions -> rows of precomputed features (B, D)."""
    return lambda pos: features[torch.from_numpy(pos)]


@torch.no_grad()
def predict_batches(model: nn.Module, inputs: Inputs, n: int, ctx: Context) -> torch.Tensor:
    """Outputs of ``model`` on all ``n`` inputs, in order, batch by batch, on the CPU."""
    model.to(ctx.device).eval()
    out = []
    for start in range(0, n, ctx.batch_size):
        pos = np.arange(start, min(n, start + ctx.batch_size))
        out.append(model(inputs(pos).to(ctx.device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
