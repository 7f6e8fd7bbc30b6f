"""SupSup: Supermasks in Superposition (Wortsman et al., NeurIPS 2020, arXiv 2006.14769; official
code RAIVNLab/supsup @6a31878, its CPU notebook ``mnist.ipynb``; spec architecture-methods §1).

A random network (signed-constant weights, no bias) is never trained. Each task learns a binary
*supermask* over its weights (``retain/layers/masked.py``); old masks never change, so nothing is
forgotten. Each mask is the task's whole network, head included: the task's classes are the first
outputs of its mask, the other outputs are superfluous (output 100 in the notebook).

Registered twice, as tags are per class: ``supsup``, mode GG, here (the task id is given in
training and at test: needs_task_id_at_test), and ``supsup_gn`` (modes GN and NNs, task inferred
at test; ``retain/methods/supsup_gn.py``), which builds on this class.

Defaults are the notebook's (FC 784-300-300-100, threshold masks, RMSprop lr 1e-4, batch 128,
1 epoch, no weight decay). Differences from the official code: masks are kept as bool and packed
to 1 bit in checkpoints (not float stacks); the frozen weights are regenerated from a stored
seed with torch's CPU generator, not stored: the state keeps their SHA-256, and loading refuses
a state whose weights this installation regenerates differently (another torch or Python
version); ``cosine=True`` steps the cosine rate after every batch (``main.py``: after every
epoch); with ``batchnorm=True``, a superposition of masks (GN/NNs task inference) normalises
with the α-weighted mean of the slots' running statistics (the official uses ``bns[-1]``, in
train mode, i.e. the batch's own statistics); GN's one-shot argmin runs over the learned slots
only (``supsup_gn.py``). ``net="resnet18_gem"`` is the official SplitCIFAR100 ``GEMResNet18``
(masked convolutions, per-task non-affine BN with ``batchnorm=True``). Not implemented: ResNet-50
(SplitImageNet), ER per-layer densities, HopSupSup, BatchE/Transfer baselines and CIFAR
augmentation. "density" is the official "sparsity".

Under torchrun (``retain/distributed.py``): each step's global batch is shared across ranks by
``training.backward_share`` ("loss" mode: its share of the cross-entropy, score gradients
summed), or replicated on every rank with ``batchnorm=True`` (the per-task BN normalises with the
batch's statistics and updates its running ones: exact only on the whole batch); the frozen
weights are regenerated from the same seed on every rank; masks are then identical everywhere.
Predictions go through ``predict_batches`` (rows split across ranks, gathered).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..context import Context
from ..datasets.base import Split
from ..errors import ConfigError
from ..layers.masked import (
    Applied,
    MaskedConv2d,
    MaskedLinear,
    MultitaskBatchNorm,
    SupermaskNet,
    check_regenerated,
    pack_masks,
    unpack_masks,
    weights_digest,
)
from ..layers.mlp import build_net
from ..params import Interval
from ..scenarios.base import Task
from ..training import backward_share, predict_batches
from .base import ANY_BACKBONE, TASK_ID_AT_TEST, Method, Needs, count, register_method

Mode = Literal["GG", "GN", "NNs"]
Net = Literal["fc300x300", "fc300x100", "fc1024", "fc312x128", "lenet_conv", "resnet18_gem"]
NEG = -1e9  # logits of classes outside the predicted mask


@register_method("supsup")
class SupSup(Method):
    paper = "Wortsman et al., NeurIPS 2020 (arXiv 2006.14769)"
    tags = frozenset({TASK_ID_AT_TEST})
    needs = Needs(ANY_BACKBONE)  # raw pixels or any features
    modes: ClassVar[tuple[str, ...]] = ("GG",)
    constraints = {"output_size": Interval(1, None), "density": Interval(0, 1, "right"),
                   "epochs": Interval(1, None), "max_steps": Interval(0, None),
                   "batch_size": Interval(1, None), "lr": Interval(0, None, "neither"),
                   "weight_decay": Interval(0, None)}

    def __init__(self, backbone, *, mode: Mode = "GG", net: Net = "fc300x300",
                 output_size: int = 100, mask: Literal["threshold", "topk"] = "threshold",
                 density: float = 0.5, batchnorm: bool = False, epochs: int = 1,
                 max_steps: int = 0, batch_size: int = 128,
                 optimizer: Literal["rmsprop", "adam", "sgd"] = "rmsprop", lr: float = 1e-4,
                 weight_decay: float = 0.0, cosine: bool = False):
        super().__init__(backbone)
        self.mode = mode  # GG: task id given; GN: inferred at test; NNs: also task-free
        self.net = net  # the random network the masks select from
        self.output_size = output_size  # outputs per mask; beyond a task's classes: superfluous
        self.mask = mask  # threshold: 1[S >= 0]; topk: the `density` largest |S|
        self.density = density  # fraction of weights kept by topk ("sparsity" officially)
        self.batchnorm = batchnorm  # non-affine BN with per-task statistics after hidden layers
        self.epochs = epochs
        self.max_steps = max_steps  # 0: no cap (official iter_lim, e.g. 1000)
        self.batch_size = batch_size
        self.optimizer = optimizer  # optimiser of the mask scores
        self.lr = lr
        self.weight_decay = weight_decay  # applied to the scores (official default 1e-4)
        self.cosine = cosine  # cosine learning rate over each task (GG/GN)
        self.net_: SupermaskNet | None = None
        self.seed_ = 0  # the frozen weights are drawn from it
        self.slot_task_: list[int] = []  # task being learned when each mask was allocated
        self.slot_classes_: list[tuple[int, ...]] = []  # GG/GN: the classes of each mask

    # -- learning ---------------------------------------------------------------------------
    def _learn(self, task: Task, ctx: Context) -> None:
        self._prepare(task, ctx)
        self._learn_slot(task, ctx)

    def _prepare(self, task: Task, ctx: Context) -> None:
        """Build the random network on first use; check that ``task`` fits this mode."""
        if self.net_ is None:
            self._check_mode()
            self.seed_ = int(torch.randint(2**62, (1,), generator=ctx.generator(0, 7)))
            self.net_ = self._make_net()
        self._check_outputs(task)
        if task.free and self.mode != "NNs":
            raise ConfigError(f"{self.name} mode {self.mode} trains one mask per task and needs "
                              f"task boundaries; on a task-free stream use mode=NNs")
        self.net_.to(ctx.device)

    def _learn_slot(self, task: Task, ctx: Context) -> None:
        """GG/GN: a new mask for ``task``, trained on it, then frozen."""
        slot = len(self.slot_task_)
        self.slot_task_.append(task.id)
        self.slot_classes_.append(task.classes)
        scores = self.net_.add_slot(slot)
        local = {c: i for i, c in enumerate(task.classes)}
        targets = torch.tensor([local[int(c)] for c in task.train.targets])  # (N,)
        opt, sched = self._optimizer(scores, self._num_steps(len(task.train)))
        gen = ctx.generator(task.id, 1)
        for pos in self._batches(len(task.train), gen):
            self._step(opt, sched, task.train, pos, targets, slot, ctx)
        ctx.dist.same_state(self.net_, gen)
        self.net_.freeze(slot)
        self.net_.eval()

    def _step(self, opt, sched, split: Split, pos: np.ndarray, targets: torch.Tensor,
              slot: int, ctx: Context) -> None:
        self.net_.train()
        x = self.backbone.preprocess(split, pos)  # (B, C, S, S), the global batch
        opt.zero_grad(set_to_none=True)
        # cross-entropy over all outputs, superfluous included
        backward_share(lambda x: self.net_(x, slot), F.cross_entropy, x, targets[pos], ctx,
                       [p for g in opt.param_groups for p in g["params"]],
                       "replicate" if self.batchnorm else "loss")
        opt.step()
        if sched is not None:
            sched.step()

    def _optimizer(self, params, steps: int, schedule: bool = True):
        kind = {"rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam,
                "sgd": torch.optim.SGD}[self.optimizer]
        extra = {"momentum": 0.9} if self.optimizer == "sgd" else {}
        opt = kind(params, lr=self.lr, weight_decay=self.weight_decay, **extra)
        use = schedule and self.cosine
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if use else None

    def _num_steps(self, n: int) -> int:
        steps = self.epochs * math.ceil(n / self.batch_size)
        return min(steps, self.max_steps) if self.max_steps else steps

    def _batches(self, n: int, generator: torch.Generator):
        """Shuffled batch positions, epoch after epoch, stopping after ``_num_steps``."""
        left = self._num_steps(n)
        while left > 0:
            perm = torch.randperm(n, generator=generator).numpy()
            for start in range(0, n, self.batch_size):
                if left == 0:
                    return
                left -= 1
                yield perm[start : start + self.batch_size]

    # -- prediction -------------------------------------------------------------------------
    def _predict(self, split: Split, ctx: Context, task_ids: np.ndarray) -> torch.Tensor:
        slots = np.asarray(task_ids)
        if slots.max() >= len(self.slot_task_):
            raise ValueError(f"{self.name} has no mask for task {int(slots.max())}")
        return self._logits(split, ctx, slots)

    @torch.no_grad()
    def _logits(self, split: Split, ctx: Context, slots: np.ndarray) -> torch.Tensor:
        """(N, num_classes_): each sample through its slot's mask; other classes NEG."""
        out = torch.full((len(split), self.num_classes_), NEG)
        for s in np.unique(slots).tolist():  # (several processes: rows split, then gathered)
            rows = np.flatnonzero(slots == s)
            cols = torch.tensor(self._classes(s))
            k = len(cols)
            view = Applied(self.net_, lambda x, s=s, k=k: self.net_(x, s)[:, :k])
            logits = predict_batches(view, lambda p, r=rows: self.backbone.preprocess(split, r[p]),
                                     len(rows), ctx)  # (n, k)
            out[torch.from_numpy(rows)[:, None], cols[None]] = logits
        return out

    def _classes(self, slot: int) -> tuple[int, ...]:
        """Global class of each leading output of ``slot``'s mask."""
        return tuple(range(self.num_classes_)) if self.mode == "NNs" else self.slot_classes_[slot]

    def _images(self, split: Split, pos: np.ndarray, ctx: Context) -> torch.Tensor:
        return self.backbone.preprocess(split, pos).to(ctx.device)  # (B, C, S, S)

    # -- building and state -----------------------------------------------------------------
    def _check_mode(self) -> None:
        if self.mode not in self.modes:
            other = "supsup" if self.mode == "GG" else "supsup_gn"
            raise ConfigError(f"{self.name}.mode = {self.mode!r}: use {other} for mode "
                              f"{self.mode} ({self.name} runs {', '.join(self.modes)})")

    def _check_outputs(self, task: Task) -> None:
        need = task.num_seen if self.mode == "NNs" else len(task.classes)
        if need > self.output_size:
            raise ConfigError(f"{self.name}: task {task.id} needs {need} outputs; raise "
                              f"output_size (now {self.output_size})")

    def _make_net(self) -> SupermaskNet:
        pre = self.backbone.preprocess
        kw = {"mask": self.mask, "density": self.density}
        body = build_net(self.net, (pre.channels, pre.size, pre.size), self.output_size,
                         linear=lambda i, o: MaskedLinear(i, o, **kw),
                         conv=lambda i, o, k, p, s=1: MaskedConv2d(i, o, k, p, s, **kw),
                         norm=MultitaskBatchNorm if self.batchnorm else None)
        return SupermaskNet(body, self.seed_)

    def _all_scores(self) -> list[torch.nn.Parameter]:
        return [p for layer in self.net_.masked_layers() for p in layer.scores.values()]

    def _state(self) -> dict[str, torch.Tensor]:
        width = max([len(c) for c in self.slot_classes_], default=0)
        classes = [list(c) + [-1] * (width - len(c)) for c in self.slot_classes_]
        classes = torch.tensor(classes, dtype=torch.long).reshape(len(classes), width)  # (T, K)
        state = {"seed": torch.tensor([self.seed_]), "slot_task": torch.tensor(self.slot_task_),
                 "slot_classes": classes, "weights_sha256": weights_digest(self.net_)}
        slots = range(len(self.slot_task_))
        for k, layer in enumerate(self.net_.masked_layers()):
            if self.mode == "NNs":  # task-free masks stay trainable: their scores are the state
                state |= {f"scores.{k}.{j}": layer.scores[str(j)].detach() for j in slots}
            else:
                state[f"masks.{k}"] = pack_masks([layer.frozen(j) for j in slots])
        for k, norm in enumerate(self.net_.norms()):
            state[f"bn.{k}.mean"] = torch.stack([norm.stats(j)[0] for j in slots])  # (T, C)
            state[f"bn.{k}.var"] = torch.stack([norm.stats(j)[1] for j in slots])
        return state

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.seed_ = int(state["seed"])
        self.slot_task_ = state["slot_task"].tolist()
        self.slot_classes_ = [tuple(c for c in row if c >= 0) for row in
                              state["slot_classes"].tolist()]
        self.net_ = self._make_net()
        check_regenerated(self.net_, state.get("weights_sha256"), self.name)
        slots = range(len(self.slot_task_))
        for k, layer in enumerate(self.net_.masked_layers()):
            if self.mode == "NNs":
                for j in slots:
                    layer.add_slot(j, state[f"scores.{k}.{j}"])
                continue
            for j, m in zip(slots, unpack_masks(state[f"masks.{k}"], layer.shape), strict=True):
                layer.freeze(j, m)
        for k, norm in enumerate(self.net_.norms()):
            for j in slots:
                norm.add_slot(j, state[f"bn.{k}.mean"][j], state[f"bn.{k}.var"][j])

    def parameter_counts(self) -> dict[str, int]:
        """trainable: what the tasks learned (mask entries, 1 bit each, or NNs float scores,
        plus per-task BN statistics); total adds the frozen random weights, which are
        regenerated from a seed and never stored."""
        backbone = count(self.backbone.model)
        if self.net_ is None:
            return {"trainable": 0, "total": backbone}
        weights = sum(layer.num_weights for layer in self.net_.masked_layers())
        stats = 2 * sum(norm.num_features for norm in self.net_.norms())
        learned = len(self.slot_task_) * (weights + stats)
        return {"trainable": learned, "total": backbone + weights + learned}

