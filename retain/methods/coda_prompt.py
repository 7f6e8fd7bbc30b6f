"""CODA-Prompt (Smith et al., "CODA-Prompt: COntinual Decomposed Attention-based Prompting for
Rehearsal-Free Continual Learning", CVPR 2023; official GT-RIPL/CODA-Prompt ``models/zoo.py``,
``learners/prompt.py``, ``utils/schedulers.py``; LAMDA-PILOT ``models/coda_prompt.py``,
``backbone/prompt.py::CodaPrompt``).

The ViT is frozen. In each block of ``layers`` a pool of ``pool_size`` components P_m (L × D)
with keys K_m and attention vectors A_m composes a prompt for the frozen query q(x):
α_m = cos(q ⊙ A_m, K_m), P(x) = Σ_m α_m P_m (see :mod:`retain.layers.coda`). Its first L/2 rows
are the key prefix and the last L/2 the value prefix of that block's attention (prefix tuning,
:mod:`retain.layers.prefix`). The final class token goes to a linear head over all seen classes.

Task t owns ``pool_size // num_tasks`` components per block, drawn by Gram–Schmidt before the
task, orthogonal to all earlier ones. Training on task t uses the components of tasks 0..t (those
of earlier tasks detached, so they never change) and minimises

    L = CE(z̃, y) + μ · Σ_blocks [ ‖KKᵀ − I‖² + ‖AAᵀ − I‖² + ‖PPᵀ − I‖² ]_mean

where z̃ keeps only the current task's logits. Adam (β = (0.9, 0.999), weight decay 0),
re-created each task, with the official per-epoch cosine: epoch e runs at
lr·cos(99π·e / (200(E − 1))) (to ≈ 0.016·lr), stepped once per epoch as the official. At test
time every learned component composes; no task id.

Deviations: the number of tasks is a hyper-parameter (the official code reads it from the
scenario); a run with more tasks is an error. Gram–Schmidt is exact against trained (no longer
mutually orthogonal) earlier components (see :mod:`retain.layers.coda`). The last, smaller batch
of an epoch is kept (the reference drops it). Inputs use the backbone's own normalisation and
retain's augmentation (the reference: RandomResizedCrop + flip, identity normalisation).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..context import Context
from ..datasets.base import Split
from ..layers.coda import ComponentPool
from ..layers.heads import IncrementalLinear
from ..layers.inject import frozen_copy, load_without_trunk, without_trunk
from ..layers.prefix import attach_prefix, forward_with_prefix
from ..params import Interval
from ..scenarios.base import Task
from ..training import fit, predict_batches, query_inputs, task_cross_entropy
from ..transforms import Augment
from .base import GROWS, VIT_OR_CLIP, Method, Needs, blocks_needed, count, register_method


@register_method("coda_prompt")
class CodaPrompt(Method):
    paper = "Smith et al., CVPR 2023 (arXiv 2211.13218)"
    tags = frozenset({GROWS})
    constraints = {"pool_size": Interval(1, None), "prompt_length": Interval(2, None),
                   "num_tasks": Interval(1, None), "ortho_mu": Interval(0, None),
                   "epochs": Interval(0, None), "lr": Interval(0, None, "neither"),
                   "batch_size": Interval(1, None), "clip_grad": Interval(0, None, "neither")}

    @classmethod
    def requirements(cls, hp: dict) -> list[Needs]:
        return [Needs(VIT_OR_CLIP),
                Needs(VIT_OR_CLIP, blocks=blocks_needed(hp["layers"]),
                      because=f"layers={hp['layers']}", fix="--set params.layers=[0,1]"),
                Needs(VIT_OR_CLIP, max_tasks=hp["num_tasks"],
                      because=f"num_tasks={hp['num_tasks']}",
                      fix="--set params.num_tasks=N (the stream's number of tasks)")]

    def __init__(self, backbone, *, pool_size: int = 100, prompt_length: int = 8,
                 layers: tuple[int, ...] = (0, 1, 2, 3, 4), num_tasks: int = 10,
                 ortho_mu: float = 0.0, epochs: int = 20, lr: float = 0.001,
                 batch_size: int = 128, augment: bool = True, clip_grad: float | None = None):
        super().__init__(backbone)
        self.pool_size = pool_size  # M components per block, shared out over num_tasks tasks
        self.prompt_length = prompt_length  # L (even): L/2 key and L/2 value prefix tokens
        self.layers = layers  # prompted blocks
        self.num_tasks = num_tasks  # T: each task owns pool_size // num_tasks components
        self.ortho_mu = ortho_mu  # μ: 0 in every shipped config (Gram–Schmidt init instead)
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.augment = augment
        self.clip_grad = clip_grad  # None: no clipping (the reference)
        self.net_: _CodaNet | None = None

    @property
    def per_task(self) -> int:
        return self.pool_size // self.num_tasks

    def _build(self) -> _CodaNet:
        if self.prompt_length % 2:
            raise ValueError(f"coda_prompt: prompt_length={self.prompt_length} must be even "
                             "(half key, half value prefix)")
        if self.per_task < 1:
            raise ValueError(f"coda_prompt: pool_size={self.pool_size} gives no component to "
                             f"each of num_tasks={self.num_tasks} tasks")
        vit = frozen_copy(self.backbone.model)
        attach_prefix(vit, self.layers, length=0)  # prefixes supplied per call
        pool = ComponentPool(len(self.layers), self.pool_size, self.prompt_length, vit.embed_dim,
                             self.backbone.feature_dim)
        return _CodaNet(vit, pool, IncrementalLinear(self.backbone.feature_dim), self)

    def _learn(self, task: Task, ctx: Context) -> None:
        if task.id >= self.num_tasks:
            raise ValueError(f"coda_prompt: task {task.id} exceeds num_tasks={self.num_tasks} "
                             "(the pool is shared out over that many tasks); raise num_tasks")
        if self.net_ is None:
            self.net_ = self._build()
        net = self.net_
        start, stop = task.id * self.per_task, (task.id + 1) * self.per_task
        net.pool.initialise(start, stop, ctx.generator(task.id, 0))
        net.head.expand(task.num_seen, ctx.generator(task.id, 1))
        net.stop.fill_(stop)
        if not self.epochs:
            return
        g = ctx.generator(task.id, 2)  # batch order and augmentation
        inputs = query_inputs(self.backbone, task.train, ctx,
                              augment=Augment() if self.augment else None, generator=g)

        def loss(out, y):
            logits, ortho = out
            return task_cross_entropy(logits, y, task.classes) + self.ortho_mu * ortho

        trainable = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.Adam(trainable, lr=self.lr, betas=(0.9, 0.999), weight_decay=0.0)
        fit(net, inputs, torch.from_numpy(task.train.targets), ctx, epochs=self.epochs,
            batch_size=self.batch_size, generator=g, loss_fn=loss, clip_grad=self.clip_grad,
            optimizer=opt, scheduler=cosine_schedule(opt, self.epochs), schedule_unit="epoch",
            desc=f"coda_prompt task {task.id}")

    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        return predict_batches(self.net_, query_inputs(self.backbone, split, ctx), len(split), ctx)

    def _state(self) -> dict[str, torch.Tensor]:
        return without_trunk(self.net_)

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.net_ = self._build()
        self.net_.head.expand(state["head.weight"].shape[0])
        load_without_trunk(self.net_, state)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable: the components, keys and attention vectors of the learned tasks, the head."""
        base = count(self.backbone.model)
        if self.net_ is None:
            return {"trainable": 0, "total": base}
        pool, f = self.net_.pool, int(self.net_.stop)
        learned = sum(t[:, :f].numel() for t in (pool.components, pool.keys, pool.attention))
        learned += count(self.net_.head)
        return {"trainable": learned, "total": base + learned}


def cosine_schedule(opt: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The official ``CosineSchedule``, stepped per epoch: epoch e at lr·cos(99π·e/(200(E−1)))."""
    def factor(e: int) -> float:
        return math.cos(99 * math.pi * e / (200 * (epochs - 1))) if epochs > 1 else 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class _CodaNet(nn.Module):
    """The frozen ViT copy with prefix sites, the component pool and the head:
    (images, queries) -> (logits, orthogonality penalty)."""

    def __init__(self, vit: nn.Module, pool: ComponentPool, head: IncrementalLinear,
                 cfg: CodaPrompt):
        super().__init__()
        self.vit, self.pool, self.head = vit, pool, head
        self.layers, self.per_task, self.ortho_mu = cfg.layers, cfg.per_task, cfg.ortho_mu
        self.register_buffer("stop", torch.zeros((), dtype=torch.long))  # components in use

    def train(self, mode: bool = True) -> _CodaNet:
        super().train(mode)
        self.vit.eval()  # the frozen ViT never trains (no dropout)
        return self

    def span(self) -> tuple[int, int]:
        """(start, stop): components [start, stop) are the current task's, [0, start) frozen."""
        stop = int(self.stop)
        return stop - self.per_task, stop

    def prefixes(self, q: torch.Tensor) -> dict[int, torch.Tensor]:
        """{block: (B, 2, L/2, D)}: the composed prompt, first half keys, second half values."""
        prompts = self.pool(q, *self.span())  # (n, B, L, D)
        n, B, L, D = prompts.shape
        return dict(zip(self.layers, prompts.view(n, B, 2, L // 2, D).unbind(0), strict=True))

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = forward_with_prefix(self.vit, x, self.prefixes(q))  # (B, D) class token
        ortho = (self.pool.ortho_loss(*self.span()) if self.training and self.ortho_mu > 0
                 else feat.new_zeros(()))
        return self.head(feat), ortho  # (B, C), ()
