"""Online EWC: Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017) in the online form of
Schwarz et al., "Progress & Compress", ICML 2018.

The whole network (backbone + linear head, as ``finetune``) is trained on the current task with

    L = CE(z[:, task classes], y) + λ/2 · Σ_i F_i (θ_i - θ*_i)²,

θ* the parameters after the previous task (for the grown head: its old rows) and F the online
diagonal Fisher: after task t, F ← γ·F + F_t, with

    F_t = 1/N Σ_n (∇_θ log p(ŷ_n | x_n))²   (squared per-sample gradients, at θ*),

ŷ_n the true label (``fisher="empirical"``) or one label drawn from the model's p(·|x_n)
(``fisher="sampled"``: a one-sample Monte-Carlo estimate of the true Fisher). The new head rows
of F are zero until their task ends. ``fisher_max`` > 0 clips F element-wise (PyCIL ``fishermax``).

Followed: Mammoth ``models/ewc_on.py`` (per-sample squared gradients of log-softmax, online
``fish = γ·fish + fish_t``, checkpoint θ* at task end); PyCIL ``models/ewc.py`` (penalty
Σ F(θ-θ*)²/2 on the old rows of a grown head, CE over the new classes' logits, λ = 1000,
``fishermax`` 1e-4). Deviations: PyCIL merges Fishers as α·F + (1-α)·F_t with α = old/seen
classes and squares batch-mean gradients (≈ 1/B of ours); Mammoth weights each squared gradient
by p(y|x) and has no 1/2; θ* is not stored in the state (it is the network as loaded: the
parameters after the previous task). The Fisher costs one forward and one backward (batch 1)
per training image per task.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..context import Context
from ..datasets.base import Split
from ..params import Interval
from ..scenarios.base import Task
from ..training import fit_with, inputs_of, network, task_cross_entropy
from .base import register_method
from .finetune import Finetune

Params = dict[str, torch.Tensor]


@register_method("ewc")
class EWC(Finetune):
    paper = ("Kirkpatrick et al., Overcoming catastrophic forgetting, PNAS 2017; online: "
             "Schwarz et al., Progress & Compress, ICML 2018")
    tags = frozenset()  # not finetune's task_free: a Fisher is estimated per task
    constraints = Finetune.constraints | {"ewc_lambda": Interval(0, None),
                                          "gamma": Interval(0, 1), "fisher_max": Interval(0, None)}

    def __init__(self, backbone, *, epochs: int = 1, lr: float = 0.01, batch_size: int = 32,
                 weight_decay: float = 0.0, momentum: float = 0.9, freeze_backbone: bool = False,
                 ewc_lambda: float = 1000.0, gamma: float = 1.0,
                 fisher: Literal["empirical", "sampled"] = "empirical", fisher_max: float = 0.0):
        super().__init__(backbone, epochs=epochs, lr=lr, batch_size=batch_size,
                         weight_decay=weight_decay, momentum=momentum,
                         freeze_backbone=freeze_backbone)
        self.ewc_lambda = ewc_lambda  # λ of the penalty λ/2 Σ F (θ - θ*)²
        self.gamma = gamma  # decay of the old Fisher (1: plain sum over tasks)
        self.fisher = fisher  # gradients of log p(true label) or of a sampled label
        self.fisher_max = fisher_max  # clip F element-wise (0: no clipping)
        self.fisher_: Params = {}  # parameter name -> online Fisher diagonal

    def _learn(self, task: Task, ctx: Context) -> None:
        if self.head_ is None:
            self.net_, self.head_ = self._fresh()
        fisher = {n: f.to(ctx.device) for n, f in self.fisher_.items()}
        params = self.named_params()
        anchor = {n: params[n].detach()[: len(f)].clone().to(ctx.device)
                  for n, f in fisher.items()}  # θ*, the rows that have a Fisher
        self.head_.expand(task.num_seen, ctx.generator(task.id, 0))

        def loss_fn(out, y):
            logits, _ = out
            return task_cross_entropy(logits, y, task.classes) + self.penalty(anchor, fisher)

        x = inputs_of(self, task.train, ctx)
        fit_with(self, lambda pos: (x(pos), torch.zeros(0)), task.train.targets, ctx,
                 ctx.generator(task.id, 1), loss_fn)
        new = fisher_diagonal(self, task.train, ctx, ctx.generator(task.id, 4))
        self.fisher_ = online_fisher(self.fisher_, new, self.gamma, self.fisher_max)

    def named_params(self) -> Params:
        """Trainable parameters by state name (``head.weight``, ``net.blocks.0...``)."""
        out = {f"head.{n}": p for n, p in self.head_.named_parameters()}
        if self.net_ is not None:
            out |= {f"net.{n}": p for n, p in self.net_.named_parameters()}
        return out

    def penalty(self, anchor: Params, fisher: Params) -> torch.Tensor:
        """λ/2 Σ F (θ - θ*)² over the parameters in ``fisher`` (of a grown head: its first
        rows); ``anchor`` holds θ* of those rows."""
        params, total = self.named_params(), 0.0
        for n, f in fisher.items():
            total = total + (f * (params[n][: len(f)] - anchor[n]).pow(2)).sum()
        return 0.5 * self.ewc_lambda * torch.as_tensor(total)

    def _state(self) -> dict[str, torch.Tensor]:
        return super()._state() | {f"fisher.{n}": f for n, f in self.fisher_.items()}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.fisher_ = {k[len("fisher."):]: v for k, v in state.items()
                        if k.startswith("fisher.")}
        super()._load_state({k: v for k, v in state.items() if not k.startswith("fisher.")})


def fisher_diagonal(m: EWC, split: Split, ctx: Context, generator: torch.Generator) -> Params:
    """1/N Σ_n (∇ log p(ŷ_n|x_n))² for every trainable parameter, one forward and backward per
    sample (as Mammoth); ŷ the label, or a draw from p(·|x_n) (sampled: the true Fisher)."""
    params = {n: p for n, p in m.named_params().items() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    model, inputs = network(m).to(ctx.device).eval(), inputs_of(m, split, ctx)
    for i in range(len(split)):
        x = inputs(np.array([i])).to(ctx.device)  # (1, ...)
        log_p = F.log_softmax(model(x).float()[0], dim=0)  # (C,)
        y = int(split.targets[i]) if m.fisher == "empirical" else int(
            torch.multinomial(log_p.detach().exp().cpu(), 1, generator=generator))
        # allow_unused: a parameter outside the forward (EfficientNet's ImageNet classifier)
        # has no gradient, so Fisher 0 and no penalty
        grads = torch.autograd.grad(log_p[y], list(params.values()), allow_unused=True)
        for f, g in zip(fisher.values(), grads, strict=True):
            if g is not None:
                f += g.pow(2)
    return {n: (f / len(split)).detach().cpu() for n, f in fisher.items()}


def online_fisher(old: Params, new: Params, gamma: float, clip: float = 0.0) -> Params:
    """γ·F_old + F_new (old rows of a grown head aligned, new rows from F_new alone), clipped
    element-wise at ``clip`` when > 0."""
    out = {}
    for n, f in new.items():
        f = f.clone()
        if n in old:
            f[: len(old[n])] += gamma * old[n]
        out[n] = f.clamp(max=clip) if clip > 0 else f
    return out
