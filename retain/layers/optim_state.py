"""An optimiser that lives across tasks, as a few official codes keep one for the whole run
(DAP ``src/engine/trainer.py``: ``make_optimizer`` once, in the trainer's constructor).

retain builds an optimiser per task; a method that carries one over builds it again each task on
its current parameters and moves the per-parameter state across by parameter name:

* ``state_by_name(opt, named)``: the state (Adam's ``step``, ``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq``; SGD's ``momentum_buffer``) as flat tensors ``<name>.<key>``, to keep
  between tasks and in checkpoints (exact resume);
* ``load_by_name(opt, named, saved)``: that state back into a new optimiser. A parameter that
  grew along its first dimension (a head with new classes) gets zero rows, what a head sized for
  every class from the start holds for classes that only ever had zero gradients;
* ``keep_zero_grads(opt)``: before every step, a parameter that has optimiser state but no
  gradient gets a zero one, as PyTorch < 2.0's ``zero_grad()`` (``set_to_none=False``) left it.
  Its momentum then keeps moving it (a parameter frozen by ``requires_grad=False`` too), as in
  the official runs (DAP: torch 1.11).
"""

from __future__ import annotations

import torch
from torch import nn


def state_by_name(opt: torch.optim.Optimizer, named: dict[str, nn.Parameter]
                  ) -> dict[str, torch.Tensor]:
    """``<name>.<key>`` -> tensor for every parameter of ``named`` that has optimiser state."""
    out = {}
    for name, p in named.items():
        for key, value in opt.state.get(p, {}).items():
            if value is None:  # SGD without momentum
                continue
            out[f"{name}.{key}"] = torch.as_tensor(value).detach().clone().cpu()
    return out


def load_by_name(opt: torch.optim.Optimizer, named: dict[str, nn.Parameter],
                 saved: dict[str, torch.Tensor]) -> None:
    """Put ``saved`` (from ``state_by_name``) into ``opt``, zero-padding grown parameters."""
    for name, p in named.items():
        prefix = f"{name}."
        entries = {k[len(prefix):]: v for k, v in saved.items()
                   if k.startswith(prefix) and "." not in k[len(prefix):]}
        if entries:
            opt.state[p] = {key: _fit(v, p) for key, v in entries.items()}


def _fit(value: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
    """A saved state tensor for ``p``: scalars as they are, others zero-padded to p's shape."""
    if value.ndim == 0:
        return value.clone()
    if value.shape[1:] != p.shape[1:] or value.shape[0] > p.shape[0]:
        raise ValueError(f"optimiser state of shape {tuple(value.shape)} does not fit a "
                         f"parameter of shape {tuple(p.shape)}")
    grown = torch.zeros(p.shape, dtype=value.dtype, device=p.device)
    grown[: value.shape[0]] = value
    return grown


def keep_zero_grads(opt: torch.optim.Optimizer) -> None:
    """Give every parameter with state and no gradient a zero gradient before each step."""

    def fill(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None and optimizer.state.get(p):
                    p.grad = torch.zeros_like(p)

    opt.register_step_pre_hook(fill)
