"""ESN (Wang et al., "Isolation and Impartial Aggregation: A Paradigm of Incremental Learning
without Interference", AAAI 2023; official code iamwangyabin/ESN ``networks.py``,
``trainer.py``, ``models/convit.py``).

The ViT is frozen. ``prompt_tokens`` shared prompt tokens (ESN's ``vitprompt``, 100 x D) enter the
sequence after the class token, after the positional embedding (no position of their own). With
``prompt_training: first_task`` (default, the paper's intent and ``freezep``) they train on the
first task only. The released code does otherwise (``prompt_training: every_task``): from task 1
on it freezes the fresh ``vitprompt`` of the new model and then replaces it by the copy of the
previous task's, which keeps ``requires_grad=True``, and the optimiser takes every trainable
parameter, so the shared prompt keeps training in every task; its ``eval`` then runs all stages
(and picks τ_t) with the last task's prompt, as retain does with its one prompt. Every task t owns a
class-attention block (ConViT's block with CaiT class attention: only the task token queries the
trunk tokens; MLP ratio 0.5, qkv bias), a task token (initialised from the backbone's class
token) and a linear classifier over its own classes; the trunk output is the token sequence
before the final norm. Training on task t minimises

    L = CE(z_t, y) + λ · (E(z_t) − E_anchor)²,   E(z) = −(1/β) · log Σ_c exp(−β z_c)

(the "energy" exactly as coded; β = 1, E_anchor = −10, λ = 0.1). After task t > 0 a temperature
τ_t is chosen from ``temperatures``: the one under which the stage of largest energy
``logsumexp(z_s / τ)`` is stage t for most of task t's training images (test transform);
τ_0 = 0.001. At test time every distinct chosen τ votes for the stage of largest energy, the most
voted stage (ties: the lowest index, as ``torch.mode``) is taken, and the image is classified
within that stage.

Cost: one trunk pass serves every stage (the official ``eval`` too, with the last stage's
prompt); training tasks t > 0 runs the trunk without gradients unless the prompt trains. The
class-attention block is initialised as the official (ConViT's ``ClassAttention`` and ``Mlp``:
trunc-normal 0.02 weights, zero biases; LayerNorm eps 1e-5). Predictions are per sample; no task
id at test. The cosine learning rate steps once per epoch (``schedule_unit="epoch"``, as the
official Lightning ``configure_optimizers``: ``CosineAnnealingLR(T_max=max_epoch)``, stepped per
epoch); ``"step"`` decays it per batch. Differences: the MSE distillation to a previous prompt is
left out (``pre_vitprompt`` is never set in the released code, so it never runs);
class-incremental only (the official ``dil`` mode folds labels modulo the class count).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..context import Context
from ..datasets.base import Split
from ..layers.inject import frozen_copy
from ..layers.prompts import block_inputs, insert_tokens, num_prefix_tokens
from ..layers.task_attention import TaskAttentionBlock
from ..params import Interval
from ..scenarios.base import Task
from ..training import ScheduleUnit, fit, image_inputs, predict_batches
from ..transforms import Augment
from .base import GROWS, NEW_CLASSES, VIT, Method, Needs, count, register_method

GATE = 1e4  # subtracted from the logits of the stages not chosen (finite, keeps their order)


@register_method("esn")
class ESN(Method):
    paper = "Wang et al., AAAI 2023 (arXiv 2208.13224)"
    tags = frozenset({GROWS})
    needs = Needs(VIT, streams=NEW_CLASSES)
    constraints = {"prompt_tokens": Interval(0, None), "epochs": Interval(0, None),
                   "lr": Interval(0, None, "neither"), "batch_size": Interval(1, None),
                   "weight_decay": Interval(0, None), "momentum": Interval(0, 1, "left"),
                   "energy_lambda": Interval(0, None), "energy_beta": Interval(0, None, "neither"),
                   "mlp_ratio": Interval(0, None, "neither")}

    def __init__(self, backbone, *, prompt_tokens: int = 100, epochs: int = 30, lr: float = 0.01,
                 batch_size: int = 128, weight_decay: float = 5e-4, momentum: float = 0.9,
                 anchor_energy: float = -10.0, energy_lambda: float = 0.1,
                 energy_beta: float = 1.0, mlp_ratio: float = 0.5,
                 temperatures: tuple[float, ...] = (0.001, 0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6,
                                                    0.7, 0.8, 0.9, 1.0),
                 prompt_training: Literal["first_task", "every_task"] = "first_task",
                 augment: bool = True, schedule_unit: ScheduleUnit = "epoch"):
        super().__init__(backbone)
        self.prompt_tokens = prompt_tokens  # shared prompt tokens, trained on task 0 then frozen
        self.epochs = epochs
        self.lr = lr
        self.prompt_training = prompt_training  # every_task: the released code's behaviour
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.anchor_energy = anchor_energy  # target energy of a stage
        self.energy_lambda = energy_lambda  # weight of the energy term
        self.energy_beta = energy_beta  # inverse temperature of the energy (a logsumexp)
        self.mlp_ratio = mlp_ratio
        self.temperatures = temperatures  # candidate temperatures of each stage's calibration
        self.augment = augment
        self.schedule_unit = schedule_unit  # cosine per epoch (official) or per batch
        self.vit_: nn.Module | None = None  # frozen copy of the backbone (not stored)
        self.prompt_: nn.Parameter | None = None  # (P, D), trained on task 0
        self.stages_ = nn.ModuleList()  # one _Stage per task
        self.offsets_: list[int] = []  # first class of each stage
        self.chosen_: list[float] = []  # τ_t per task

    # -- the network ----------------------------------------------------------------------
    def _trunk(self) -> nn.Module:
        if self.vit_ is None:
            self.vit_ = frozen_copy(self.backbone.model)
        return self.vit_

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> the trunk's tokens before the final norm (B, 1+P+N, D)."""
        vit, prompt = self._trunk(), self.prompt_
        at = num_prefix_tokens(vit)
        edit = {0: lambda seq: insert_tokens(seq, prompt.expand(len(seq), -1, -1), at)}
        seen: list[torch.Tensor] = []
        hook = vit.norm.register_forward_hook(lambda m, args, out: seen.append(args[0]))
        try:
            with block_inputs(vit, edit):
                vit.forward_features(x)
        finally:
            hook.remove()
        return seen[0]  # (B, 1+P+N, D)

    def _new_stage(self, num_classes: int, generator: torch.Generator) -> _Stage:
        dim = self.backbone.feature_dim
        heads = self._trunk().blocks[0].attn.num_heads
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
            block = TaskAttentionBlock(dim, heads, self.mlp_ratio, qkv_bias=True)
            head = nn.Linear(dim, num_classes)
        token = self._trunk().cls_token.detach().clone()  # (1, 1, D), ESN copies the class token
        return _Stage(block, nn.Parameter(token), head)

    # -- learning -------------------------------------------------------------------------
    def _learn(self, task: Task, ctx: Context) -> None:
        if set(task.classes) != set(task.new_classes) or not task.new_classes:
            raise ValueError("ESN is class-incremental: every task must bring only new classes")
        if self.prompt_ is None:
            bound = self.backbone.feature_dim ** -0.5  # nn.Linear(D, P).weight's init
            self.prompt_ = nn.Parameter(torch.empty(self.prompt_tokens, self.backbone.feature_dim)
                                        .uniform_(-bound, bound, generator=ctx.generator(0, 0)))
        stage = self._new_stage(len(task.classes), ctx.generator(task.id, 1))
        trains = task.id == 0 or self.prompt_training == "every_task"  # first_task: freezep
        self.prompt_.requires_grad_(trains)
        self._train(stage, task, ctx)
        self.prompt_.requires_grad_(False)
        self.stages_.append(stage.requires_grad_(False).eval())
        self.offsets_.append(min(task.classes))
        self.chosen_.append(self._temperature(task, ctx) if task.id else 0.001)

    def _train(self, stage: _Stage, task: Task, ctx: Context) -> None:
        if not self.epochs:
            return
        g = ctx.generator(task.id, 2)
        inputs = image_inputs(self.backbone, task.train,
                              augment=Augment() if self.augment else None, generator=g)

        def loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(z, y) + self.energy_lambda * (
                (self.energy(z) - self.anchor_energy) ** 2).mean()

        model = _Trained(self, stage, grad_through_trunk=self.prompt_.requires_grad)
        local = torch.from_numpy(task.train.targets) - min(task.classes)
        fit(model, inputs, local, ctx, epochs=self.epochs, lr=self.lr,
            batch_size=self.batch_size, weight_decay=self.weight_decay,
            momentum=self.momentum, generator=g, loss_fn=loss, schedule_unit=self.schedule_unit,
            desc=f"esn task {task.id}")

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """(B, k) -> (B,): E(z) = −(1/β) log Σ exp(−β z), as the official loss computes it."""
        return -torch.logsumexp(-self.energy_beta * z, dim=1) / self.energy_beta

    @torch.no_grad()
    def _temperature(self, task: Task, ctx: Context) -> float:
        """The τ under which task t's training images pick stage t most often."""
        logits = self._stage_logits(task.train, ctx)  # list over stages of (N, k_s)
        hits = [float((stage_energies(logits, tau).argmax(1) == task.id).float().mean())
                for tau in self.temperatures]
        return self.temperatures[int(np.argmax(hits))]

    # -- prediction -----------------------------------------------------------------------
    def _stage_logits(self, split: Split, ctx: Context) -> list[torch.Tensor]:
        out = predict_batches(_AllStages(self), image_inputs(self.backbone, split), len(split),
                              ctx)  # (N, C) concatenated stage logits
        sizes = [s.head.out_features for s in self.stages_]
        return list(out.split(sizes, dim=1))

    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        logits = self._stage_logits(split, ctx)  # T x (N, k_s)
        stage = vote(logits, sorted(set(self.chosen_)))  # (N,)
        gated = [z - GATE * (stage != s).float()[:, None] for s, z in enumerate(logits)]
        return torch.cat(gated, dim=1)  # (N, C)

    # -- state ----------------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        state = {"prompt": self.prompt_.data, "chosen": torch.tensor(self.chosen_),
                 "offsets": torch.tensor(self.offsets_)}
        return state | {f"stages.{k}": v for k, v in self.stages_.state_dict().items()}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.prompt_ = nn.Parameter(state["prompt"], requires_grad=False)
        self.chosen_ = [float(t) for t in state["chosen"]]
        self.offsets_ = [int(o) for o in state["offsets"]]
        sizes = [int(v.shape[0]) for k, v in sorted(state.items(), key=lambda kv: _index(kv[0]))
                 if k.startswith("stages.") and k.endswith("head.weight")]
        self.stages_ = nn.ModuleList()
        for k in sizes:
            self.stages_.append(self._new_stage(k, torch.Generator()).eval())
        self.stages_.load_state_dict({k[7:]: v for k, v in state.items()
                                      if k.startswith("stages.")})
        self.stages_.requires_grad_(False)

    def parameter_counts(self) -> dict[str, int]:
        base = count(self.backbone.model)
        learned = count(self.stages_) + (0 if self.prompt_ is None else self.prompt_.numel())
        return {"trainable": learned, "total": base + learned}


def _index(key: str) -> int:
    parts = key.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1


def stage_energies(logits: list[torch.Tensor], tau: float) -> torch.Tensor:
    """T x (N, k_s) -> (N, T): logsumexp(z_s / τ) per stage."""
    return torch.stack([torch.logsumexp(z / tau, dim=1) for z in logits], dim=1)


def vote(logits: list[torch.Tensor], taus: list[float]) -> torch.Tensor:
    """(N,) the stage most temperatures pick by largest energy (ties: the lowest stage)."""
    picks = torch.stack([stage_energies(logits, t).argmax(1) for t in taus], dim=1)  # (N, |τ|)
    return torch.mode(picks, dim=1).values


class _Stage(nn.Module):
    """One task's class-attention block, task token and classifier."""

    def __init__(self, block: TaskAttentionBlock, token: nn.Parameter, head: nn.Linear):
        super().__init__()
        self.block, self.token, self.head = block, token, head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, M, D) trunk tokens -> (B, k) logits."""
        t = self.block(self.token.expand(len(tokens), -1, -1), tokens)  # (B, 1, D)
        return self.head(t[:, 0])


class _Frozen(nn.Module):
    """Holds the frozen trunk as a submodule (moved with the model) that never trains."""

    def train(self, mode: bool = True) -> _Frozen:
        super().train(mode)
        self.vit.eval()
        return self


class _Trained(_Frozen):
    """Images -> the new stage's logits (the trunk and, after task 0, the prompt frozen)."""

    def __init__(self, esn: ESN, stage: _Stage, grad_through_trunk: bool):
        super().__init__()
        self.stage, self.prompt, self.vit = stage, esn.prompt_, esn._trunk()
        self.esn, self.grad = [esn], grad_through_trunk  # a list: not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            tokens = self.esn[0].tokens(x)  # (B, M, D)
        return self.stage(tokens)


class _AllStages(_Frozen):
    """Images -> every stage's logits, concatenated, from one trunk pass."""

    def __init__(self, esn: ESN):
        super().__init__()
        self.stages, self.prompt, self.vit, self.esn = esn.stages_, esn.prompt_, esn._trunk(), [esn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.esn[0].tokens(x)  # (B, M, D)
        return torch.cat([s(tokens) for s in self.stages], dim=1)  # (B, C)
