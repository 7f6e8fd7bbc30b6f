"""Sparse, growable MLPs kept as plain tensor lists (used by DEN, ``retain/methods/den.py``).

A hidden layer is an (in, out) weight matrix and an (out,) bias, so a hidden unit is a column of
the matrix below it and a row of the matrix above it (or of the head). Here:

- proximal operators, applied in place after an optimiser step: the element-wise L1 soft
  threshold and the column-wise group-lasso threshold (Yoon et al., ICLR 2018, eq. 3-4; official
  ``DEN.py::optimization``);
- TensorFlow's default (glorot uniform) initialiser, and the ReLU forward pass;
- the drift penalty that pulls the old slice of grown tensors to its previous values;
- the training loop of every DEN phase (Adam, then the proximal steps), shared across the
  processes of a torchrun launch;
- structural operations on such a network: the units reached from a head through non-zero
  weights, deletion of appended units whose incoming weights are all zero, duplication of units
  (the original gets its old weights back, a copy keeps the new ones), and the units that drifted
  most from a previous copy of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from ..training import backward_share

Head = tuple[torch.Tensor, torch.Tensor]  # (width, k) weight, (k,) bias


def soft_threshold_(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """L1 proximal step, in place: x <- sign(x) max(|x| - threshold, 0)."""
    return x.copy_(x.sign() * (x.abs() - threshold).clamp_min(0))


def group_soft_threshold_(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """Group-lasso proximal step, in place, one group per column (a unit's incoming weights):
    w_g <- w_g max(0, 1 - threshold / ||w_g||_2)."""
    norm = w.norm(dim=0, keepdim=True)  # (1, out)
    return w.mul_((1 - threshold / norm.clamp_min(1e-12)).clamp_min(0))


def glorot(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """TensorFlow's default initialiser (glorot uniform; a vector of n uses fans n and n)."""
    fan_in, fan_out = (shape[0], shape[-1])
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def leaves(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Detached trainable copies."""
    return [t.detach().clone().requires_grad_() for t in tensors]


def forward(x: torch.Tensor, weights, biases, head: Head) -> torch.Tensor:
    """ReLU MLP then a linear head."""
    for w, b in zip(weights, biases, strict=True):
        x = torch.relu(x @ w + b)  # (B, out)
    return x @ head[0] + head[1]  # (B, k)


def drift_penalty(now: list[torch.Tensor], old: list[torch.Tensor], weight: float
                  ) -> Callable[[], torch.Tensor]:
    """A closure: weight/2 sum ||now[old slice] - old||^2 (each ``now`` may have grown past its
    ``old``: the leading rows / columns are the old ones)."""
    def penalty() -> torch.Tensor:
        return weight / 2 * sum((n[tuple(slice(s) for s in o.shape)] - o).pow(2).sum()
                                for n, o in zip(now, old, strict=True))
    return penalty


def reachable_units(weights: list[torch.Tensor], head_w: torch.Tensor) -> list[torch.Tensor]:
    """Per hidden layer, breadth-first from the top, the units with a non-zero weight into any
    output of the head or any reached unit above (all units of a layer where none is)."""
    keep = [(head_w != 0).any(1)]  # (width,)
    for w in reversed(weights[1:]):
        keep.insert(0, (w[:, keep[0]] != 0).any(1))
    return [k.nonzero().flatten() if k.any() else torch.arange(len(k)) for k in keep]


def drop_dead_units(weights: list[torch.Tensor], biases: list[torch.Tensor], head_w: torch.Tensor,
                    new: int) -> torch.Tensor:
    """Delete, top-down, those of the last ``new`` units of each layer whose incoming weights are
    all zero (``weights`` / ``biases`` are edited in place); returns the head's weight rows."""
    for layer in reversed(range(len(weights))):
        w = weights[layer]
        alive = torch.ones(w.shape[1], dtype=torch.bool)
        alive[-new:] = (w[:, -new:] != 0).any(0)
        weights[layer], biases[layer] = w[:, alive], biases[layer][alive]
        if layer + 1 < len(weights):
            weights[layer + 1] = weights[layer + 1][alive]
        else:
            head_w = head_w[alive]
    return head_w


def most_drifted(w: torch.Tensor, prev: torch.Tensor, threshold: float, k: int) -> torch.Tensor:
    """At most k old units whose incoming weights moved by rho = ||w - prev||_2 > threshold,
    most drifted first (``prev`` covers the old rows and columns of ``w``)."""
    rho = (w[: prev.shape[0], : prev.shape[1]] - prev).norm(dim=0)  # (old units,)
    cand = (rho > threshold).nonzero().flatten()
    return cand[rho[cand].argsort(descending=True)][:k]


def duplicate_units(weights: list[torch.Tensor], biases: list[torch.Tensor],
                    prev: tuple[list[torch.Tensor], list[torch.Tensor]],
                    chosen: list[torch.Tensor], head_w: torch.Tensor) -> torch.Tensor:
    """Per layer, the ``chosen`` units get back their ``prev`` (weights, biases) incoming and
    outgoing values, and copies holding their current values are appended (``weights`` /
    ``biases`` edited in place); returns the head's weight rows, the copies' rows appended."""
    for layer, idx in enumerate(chosen):
        w, b, p = weights[layer], biases[layer], prev[0][layer]
        copy_w, copy_b = w[:, idx].clone(), b[idx].clone()
        w[: p.shape[0], idx], b[idx] = p[:, idx], prev[1][layer][idx]
        weights[layer] = torch.cat([w, copy_w], 1)
        biases[layer] = torch.cat([b, copy_b])
        if layer + 1 < len(weights):  # outgoing rows: the original's restored
            up, p_up = weights[layer + 1], prev[0][layer + 1]
            copy_up = up[idx].clone()
            up[idx, : p_up.shape[1]] = p_up[idx]
            weights[layer + 1] = torch.cat([up, copy_up], 0)
        else:
            head_w = torch.cat([head_w, head_w[idx]], 0)
    return head_w


def data_loss(logits: torch.Tensor, y: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """DEN's loss: sigmoid cross-entropy on one-hot targets ("bce", the official) or softmax
    cross-entropy ("ce"); logits (B, k), labels (B,)."""
    if kind == "ce":
        return F.cross_entropy(logits, y)
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)  # (B, k)
    return F.binary_cross_entropy_with_logits(logits, onehot)


def train_prox(m, params: list[torch.Tensor], fwd: Callable, data, steps: int, ctx,
               penalty: Callable | None = None, groups: list[torch.Tensor] = ()) -> float:
    """``steps`` Adam steps on random minibatches of ``data`` = (x, y, generator) through
    ``fwd``, each followed by the L1 soft threshold (and the group threshold on ``groups``),
    with DEN ``m``'s settings; returns the last minibatch's data loss.

    Loss: data loss + m.l2/2 ||params||^2 (+ ``penalty()``). Several processes: every rank draws
    the same global minibatch, ``backward_share`` splits it ("loss" mode: the batch-independent
    terms weighted by each rank's share), so every rank takes the same step; the returned loss
    is the whole global batch's."""
    x, y, gen = data
    opt = torch.optim.Adam(params, lr=m.lr)
    last = [torch.tensor(float("nan")), 1]  # this rank's data loss and its rows

    def objective(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = data_loss(out, y, m.loss)
        last[:] = loss.detach(), len(y)
        total = loss + m.l2 / 2 * sum(p.pow(2).sum() for p in params)
        return total + (penalty() if penalty else 0.0)

    for step in range(steps):
        decay = m.lr_decay ** (step * m.batch_size // len(x))
        for group in opt.param_groups:
            group["lr"] = m.lr * decay
        shrink = decay if m.scale_prox else 1.0
        pos = torch.randperm(len(x), generator=gen)[: m.batch_size]
        opt.zero_grad(set_to_none=True)
        backward_share(fwd, objective, x[pos], y[pos], ctx, params)
        opt.step()
        with torch.no_grad():
            for p in params:
                soft_threshold_(p, m.l1 * shrink)
            for g in groups:  # a column (a new unit's incoming weights) is a group
                group_soft_threshold_(g, m.group_lasso * shrink)
    # the global batch's mean (one process: exactly the loss, a float32 times and over an int)
    return ctx.dist.sum(float(last[0]) * last[1]) / ctx.dist.sum(last[1])
