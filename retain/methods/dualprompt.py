"""DualPrompt (Wang et al., "DualPrompt: Complementary Prompting for Rehearsal-free Continual
Learning", ECCV 2022; PyTorch port JH-LEE-KR/dualprompt-pytorch, LAMDA-PILOT
``models/dualprompt.py``, ``backbone/prompt.py::EPrompt``).

The ViT is frozen. Two kinds of prefix prompts enter its attention (per head ``K' = [P_K ; K]``,
``V' = [P_V ; V]``, see :mod:`retain.layers.prefix`):

* the G-prompt, shared by all tasks, in blocks ``g_layers`` (L_g tokens each);
* E-prompts in blocks ``e_layers`` (L_e tokens each), one per task, from a pool of ``pool_size``
  entries, each with a key k_i (all ``U(-1, 1)``).

Training on task t uses E-prompt t for every sample (the task id is known while training:
``use_prompt_mask`` with top-1 in the reference code) and minimises

    L = CE(z̃, y) − λ · (1/B) Σ_b cos(q_b, k_t)

where q is the frozen ViT's feature of the image and z̃ keeps only the current task's logits.
The feature is the final class token of the prompted pass (``head_type="token"``), scored by a
linear head over all seen classes (rows start as the official timm ViT head: N(0, 0.02²),
bias 0). With ``shared_prompt_pool`` E-prompt t starts as a copy of
E-prompt t−1. Adam at a constant rate, re-created each task.

At test time each sample takes the E-prompt of its top-1 key among the keys of the tasks learned
so far. ``batchwise_prompt=True`` reproduces the reference code's batch vote (the most frequent
top-1 index of the batch is used for every sample) and labels the run as using batch
information (protocol-pitfalls §1.1).

Deviations from the reference code: selection at test time is per sample by default and only the
keys of learned tasks compete (the reference code and PILOT match all ``pool_size`` keys, so
before the last task a sample can take an untrained key and its random E-prompt; this moves
their intermediate stages, and with few training steps, when the keys have barely moved from
U(-1, 1), even the last: ``test_keys="pool"`` reproduces it); more tasks
than pool entries is an error (the reference silently falls back to key matching in training);
E-prefixes are gathered per sample with K/V kept apart (the layout DP-pt's ``reshape`` mixes for
batches larger than one, pitfalls §4.36: it reads the (K/V, sample) stack as (sample, K/V), so
sample b gets slots 2b and 2b+1; in training, with one forced prompt, half the batch runs with
(P_K, P_K) and half with (P_V, P_V); at test a sample borrows its neighbours' choices. PILOT
inherits it. ``e_prefix_layout="reference"`` reproduces it and labels the run as using batch
information). No label smoothing, as DP-pt: its configs declare
``--smoothing 0.1`` but its criterion is a plain ``CrossEntropyLoss`` (``main.py``, ``engine.py``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..context import Context
from ..datasets.base import Split
from ..layers.heads import IncrementalLinear
from ..layers.inject import frozen_copy, load_without_trunk, without_trunk
from ..layers.prefix import attach_prefix, forward_with_prefix
from ..layers.prompts import KeyedPool, pull_loss, select
from ..params import Interval
from ..scenarios.base import Task
from ..training import fit, predict_batches, query_inputs, task_cross_entropy
from ..transforms import Augment
from .base import VIT, Method, Needs, blocks_needed, count, register_method


@register_method("dualprompt")
class DualPrompt(Method):
    paper = "Wang et al., ECCV 2022 (arXiv 2204.04799)"
    constraints = {"g_length": Interval(1, None), "e_length": Interval(1, None),
                   "pool_size": Interval(1, None), "pull_coeff": Interval(0, None),
                   "epochs": Interval(0, None), "lr": Interval(0, None, "neither"),
                   "batch_size": Interval(1, None), "clip_grad": Interval(0, None, "neither")}

    @classmethod
    def requirements(cls, hp: dict) -> list[Needs]:
        layers = tuple(hp["g_layers"]) + tuple(hp["e_layers"])
        return [Needs(VIT), Needs(VIT, blocks=blocks_needed(layers),
                                  because=f"g_layers={hp['g_layers']}, e_layers={hp['e_layers']}",
                                  fix="--set params.g_layers=[0] --set params.e_layers=[1]"),
                Needs(VIT, max_tasks=hp["pool_size"], because=f"pool_size={hp['pool_size']}",
                      fix="--set params.pool_size=N (one E-prompt per task)")]

    def __init__(self, backbone, *, g_layers: tuple[int, ...] = (0, 1),
                 e_layers: tuple[int, ...] = (2, 3, 4), g_length: int = 5, e_length: int = 5,
                 pool_size: int = 10, pull_coeff: float = 0.1, epochs: int = 5,
                 lr: float = 0.001, batch_size: int = 24, clip_grad: float | None = 1.0,
                 augment: bool = True, shared_prompt_pool: bool = True,
                 batchwise_prompt: bool = False, test_keys: Literal["learned", "pool"] = "learned",
                 e_prefix_layout: Literal["per_sample", "reference"] = "per_sample"):
        super().__init__(backbone)
        self.g_layers = g_layers  # blocks with the shared G-prompt (() for none)
        self.e_layers = e_layers  # blocks with the task's E-prompt
        self.g_length = g_length  # tokens of each G-prompt (shared by all tasks)
        self.e_length = e_length  # tokens of each E-prompt (one per task)
        self.pool_size = pool_size  # E-prompts and keys: at most this many tasks
        self.pull_coeff = pull_coeff  # λ: PILOT 0.1, DP-pt 1.0
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.clip_grad = clip_grad  # None: no clipping (PILOT); DP-pt clips at 1.0
        self.augment = augment
        self.shared_prompt_pool = shared_prompt_pool  # E-prompt t starts as a copy of E-prompt t-1
        self.batchwise_prompt = batchwise_prompt
        self.test_keys = test_keys  # keys that compete at test: learned tasks' or all (DP-pt)
        self.e_prefix_layout = e_prefix_layout  # "reference": DP-pt's K/V-mixing reshape
        self.net_: _DualPromptNet | None = None

    @property
    def uses_batch_information(self) -> bool:
        return self.batchwise_prompt or self.e_prefix_layout == "reference"

    def _build(self, generator: torch.Generator | None = None) -> _DualPromptNet:
        both = set(self.g_layers) & set(self.e_layers)
        if both or not self.e_layers:
            raise ValueError(f"dualprompt: e_layers {self.e_layers} must be non-empty and "
                             f"disjoint from g_layers {self.g_layers}")
        vit = frozen_copy(self.backbone.model)
        attach_prefix(vit, sorted(self.g_layers + self.e_layers), length=0)  # prefixes per call
        dim = self.backbone.feature_dim
        g = _uniform((len(self.g_layers), 2, self.g_length, dim), generator)  # (Kg, 2, Lg, D)
        e = _uniform((self.pool_size, len(self.e_layers), 2, self.e_length, dim),
                     generator)  # (M, Ke, 2, Le, D)
        keys = KeyedPool(self.pool_size, dim, generator=generator)  # (M, D)
        return _DualPromptNet(vit, g, e, keys, IncrementalLinear(dim, init="timm"), self)

    def _learn(self, task: Task, ctx: Context) -> None:
        if task.id >= self.pool_size:
            raise ValueError(f"dualprompt: task {task.id} needs E-prompt {task.id} but "
                             f"pool_size={self.pool_size}; raise pool_size")
        if self.net_ is None:
            self.net_ = self._build(ctx.generator(0, 0))
        net = self.net_
        net.head.expand(task.num_seen, ctx.generator(task.id, 1))
        if task.id > 0 and self.shared_prompt_pool:
            with torch.no_grad():
                net.e_prompts[task.id] = net.e_prompts[task.id - 1]
        net.learned.fill_(task.id + 1)
        if not self.epochs:
            return
        g = ctx.generator(task.id, 2)  # batch order and augmentation
        base = query_inputs(self.backbone, task.train, ctx,
                            augment=Augment() if self.augment else None, generator=g)

        def inputs(pos):  # (images, queries, forced E-prompt index = t)
            return *base(pos), torch.full((len(pos),), task.id)

        def loss(out, y):
            logits, pull = out
            return task_cross_entropy(logits, y, task.classes) - self.pull_coeff * pull

        trainable = [p for p in net.parameters() if p.requires_grad]
        fit(net, inputs, torch.from_numpy(task.train.targets), ctx, epochs=self.epochs,
            batch_size=self.batch_size, generator=g, loss_fn=loss, clip_grad=self.clip_grad,
            optimizer=torch.optim.Adam(trainable, lr=self.lr), desc=f"dualprompt task {task.id}")

    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        return predict_batches(self.net_, query_inputs(self.backbone, split, ctx), len(split), ctx)

    def _state(self) -> dict[str, torch.Tensor]:
        return without_trunk(self.net_)

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.net_ = self._build()
        self.net_.head.expand(state["head.weight"].shape[0])
        load_without_trunk(self.net_, state)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable: the G-prompt, the E-prompts and keys of the tasks learned, the head."""
        base = count(self.backbone.model)
        if self.net_ is None:
            return {"trainable": 0, "total": base}
        net, t = self.net_, self.tasks_learned_
        learned = (net.g_prompt.numel() + net.e_prompts[:t].numel() + net.keys.keys[:t].numel()
                   + count(net.head))
        return {"trainable": learned, "total": base + learned}


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape).uniform_(-1.0, 1.0, generator=generator))


class _DualPromptNet(nn.Module):
    """The frozen ViT copy with prefix sites, G- and E-prompts, keys and head:
    (images, queries[, forced E-prompt index]) -> (logits, pull)."""

    def __init__(self, vit: nn.Module, g_prompt: nn.Parameter, e_prompts: nn.Parameter,
                 keys: KeyedPool, head: IncrementalLinear, cfg: DualPrompt):
        super().__init__()
        self.vit, self.g_prompt, self.e_prompts, self.keys, self.head = (
            vit, g_prompt, e_prompts, keys, head)
        self.g_layers, self.e_layers = cfg.g_layers, cfg.e_layers
        self.batchwise = cfg.batchwise_prompt
        self.all_keys = cfg.test_keys == "pool"
        self.mixed = cfg.e_prefix_layout == "reference"
        self.register_buffer("learned", torch.zeros((), dtype=torch.long))  # keys that compete

    def train(self, mode: bool = True) -> _DualPromptNet:
        super().train(mode)
        self.vit.eval()  # the frozen ViT never trains (no dropout, as the reference)
        return self

    def choose(self, sim: torch.Tensor) -> torch.Tensor:
        """(B, M) similarities -> (B, 1): the top-1 key among the learned tasks' keys (or among
        all ``pool_size`` keys, trained or not: ``test_keys="pool"``)."""
        allowed = sim.shape[1] if self.all_keys else int(self.learned)
        return select(sim, 1, batchwise=self.batchwise, allowed=allowed)

    def prefixes(self, idx: torch.Tensor) -> dict[int, torch.Tensor]:
        """{block: (B, 2, L, D)}: the G-prompt for everyone, E-prompt ``idx[b]`` for sample b."""
        e = self.e_prompts[idx]  # (B, Ke, 2, Le, D)
        if self.mixed:  # DP-pt: (2, B, L, D) read as (B, 2, L, D): K/V halves of other samples
            e = e.permute(1, 2, 0, 3, 4).reshape(e.shape[1], *e.shape[:1], *e.shape[2:])
            e = e.transpose(0, 1)  # (B, Ke, 2, Le, D) again, mixed as the reference's
        out = {b: p.expand(len(idx), -1, -1, -1)
               for b, p in zip(self.g_layers, self.g_prompt, strict=True)}
        return out | {b: e[:, i] for i, b in enumerate(self.e_layers)}

    def forward(self, x: torch.Tensor, q: torch.Tensor, forced: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        sim = self.keys.similarity(q)  # (B, M)
        idx = forced[:, None] if forced is not None else self.choose(sim)  # (B, 1)
        feat = forward_with_prefix(self.vit, x, self.prefixes(idx[:, 0]))  # (B, D) class token
        return self.head(feat), pull_loss(sim, idx)  # (B, C), ()
