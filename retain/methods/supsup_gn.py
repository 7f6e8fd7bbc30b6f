"""SupSup without the task id at test (Wortsman et al., NeurIPS 2020, arXiv 2006.14769; official
code RAIVNLab/supsup @6a31878 ``trainers/nns.py``, ``adaptors.py``; spec architecture-methods
§1.4). The masks, their network and their training are ``supsup``'s (``supsup.py``); this class
adds the two modes that infer the task:

- mode GN: the id is given in training only; at test the task of every sample is
  inferred by the one-shot algorithm: alpha uniform over the *learned* slots, the gradient g of
  the output entropy H (or of G, the logsumexp over superfluous outputs) w.r.t. alpha, task =
  argmin g; or by binary search (keep the slots with g <= median until one is left).
  ``per_batch=True`` is the official evaluation protocol, labelled: one inference per test batch
  of ``batch_size`` from its first ``examples`` samples (predictions then depend on the batch).
- mode NNs: no task id in training either (task-free). Every ``nns_every``
  batches, alpha is uniform over n = max(#masks, 5) slots (untrained slots are their initial
  random masks), g = -dH/dalpha; if max softmax(g) < ``nns_threshold``/n a new mask is allocated,
  else the mask argmax g trains on. Labels are shared (output j = class j). Its stream is a
  task-free one (``TaskFree{k}:Permuted5``: unmarked segments of k samples, one ``learn`` call
  each); given whole tasks it ignores their boundaries too. The batch count that times the
  detection runs over the whole stream, across calls (the official counter restarts with every
  task's loader, so it always checks at a task's start: a boundary hint a task-free learner
  does not get). A check that comes k batches after a task change comes after k steps of the
  current mask on the new data, which then looks confident: set ``nns_every`` to the steps of
  one segment (a check whenever new data arrives). Measured (``benchmarks/supsup_permuted.py``,
  5 permuted MNIST-5k tasks, segments of 500, FC 784-300-100 with 500 outputs): checked at every
  segment, 5 masks, task inference 100 %; every 100 batches, 2 masks. The id of the call that
  allocated a mask is kept only to report task inference (the evaluator maps segment ids to
  tasks).

Differences from the official code: task inference takes the argmin over learned slots only
(pitfall §4.20), per sample by default; the NNs detection count runs across calls (above).

Under torchrun: training as ``supsup`` (``backward_share``, "loss" mode; whole batches on every
rank with ``batchnorm=True``); NNs's detection (new mask or which mask trains) is taken on rank 0
and broadcast; per-sample task inference goes through ``predict_batches`` (rows split across
ranks, gathered); ``per_batch`` inference runs whole on every rank.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..context import Context
from ..datasets.base import Split
from ..layers.masked import Applied, entropy, superfluous_logsumexp
from ..params import Interval
from ..scenarios.base import Task
from ..training import predict_batches
from .base import TASK_FREE, register_method
from .supsup import Mode, Net, SupSup

NNS_MIN_SLOTS = 5  # the task-free detector compares at least 5 masks (official ``maxn``)


@register_method("supsup_gn")
class SupSupGN(SupSup):
    """SupSup without the task id at test: GN (task inferred) or NNs (task-free)."""

    tags = frozenset({TASK_FREE})  # mode NNs only; GN refuses unmarked segments
    modes = ("GN", "NNs")
    constraints = SupSup.constraints | {"examples": Interval(1, None),
                                        "nns_threshold": Interval(0, None, "neither"),
                                        "nns_every": Interval(1, None)}

    def __init__(self, backbone, *, mode: Mode = "GN", net: Net = "fc300x300",
                 output_size: int = 100, mask: Literal["threshold", "topk"] = "threshold",
                 density: float = 0.5, batchnorm: bool = False, epochs: int = 1,
                 max_steps: int = 0, batch_size: int = 128,
                 optimizer: Literal["rmsprop", "adam", "sgd"] = "rmsprop", lr: float = 1e-4,
                 weight_decay: float = 0.0, cosine: bool = False,
                 inference: Literal["oneshot", "binary"] = "oneshot",
                 objective: Literal["entropy", "superfluous"] = "entropy",
                 per_batch: bool = False, examples: int = 1, nns_threshold: float = 1.125,
                 nns_every: int = 100):
        super().__init__(backbone, mode=mode, net=net, output_size=output_size, mask=mask,
                         density=density, batchnorm=batchnorm, epochs=epochs,
                         max_steps=max_steps, batch_size=batch_size, optimizer=optimizer, lr=lr,
                         weight_decay=weight_decay, cosine=cosine)
        self.inference = inference  # one-shot argmin, or binary search (halving by the median)
        self.objective = objective  # entropy (H) or superfluous-neuron logsumexp (G)
        self.per_batch = per_batch  # official protocol: one inference per test batch (labelled)
        self.examples = examples  # per_batch: samples of the batch used (data_to_repeat)
        self.nns_threshold = nns_threshold  # NNs: new mask when max softmax(g) < this / n
        self.nns_every = nns_every  # NNs: batches between two detections
        self.nns_steps_ = 0  # NNs: batches trained over the whole stream
        self.nns_slot_ = 0  # NNs: the mask being trained

    # -- learning ---------------------------------------------------------------------------
    def _learn(self, task: Task, ctx: Context) -> None:
        self._prepare(task, ctx)
        (self._learn_task_free if self.mode == "NNs" else self._learn_slot)(task, ctx)

    def _learn_task_free(self, task: Task, ctx: Context) -> None:
        """NNs: every ``nns_every`` batches *of the whole stream* (the count runs across calls,
        so nothing depends on where a call begins), detect a new mask or pick the one to train;
        in between, the current mask trains on."""
        targets = torch.from_numpy(task.train.targets)  # shared labels: output j = class j
        opt = None
        gen = ctx.generator(task.id, 1)
        for pos in self._batches(len(task.train), gen):
            if self.nns_steps_ % self.nns_every == 0 or not self.slot_task_:
                self.nns_slot_, new = self._detect(task.train, pos, task.id, ctx)
                if opt is not None and new:
                    opt.add_param_group({"params": self._slot_scores(self.nns_slot_)})
            if opt is None:
                opt, _ = self._optimizer(self._all_scores(), 0, schedule=False)
            self._step(opt, None, task.train, pos, targets, self.nns_slot_, ctx)
            self.nns_steps_ += 1
        ctx.dist.same_state(self.net_, gen)
        self.net_.eval()

    def _detect(self, split: Split, pos: np.ndarray, task_id: int, ctx: Context
                ) -> tuple[int, bool]:
        """(mask to train, whether it is new), decided on rank 0 and broadcast."""
        known = self._confident(self._images(split, pos, ctx)) if ctx.dist.is_main else None
        known = ctx.dist.broadcast_object(known)
        if known is not None:
            return known, False
        learned = len(self.slot_task_)
        self.net_.add_slot(learned)
        self.slot_task_.append(task_id)
        return learned, True

    def _confident(self, x: torch.Tensor) -> int | None:
        """SupSup's gradient-confidence test on the batch ``x``: the learned mask that fits it
        best, or None (a new mask) when no mask is confident enough."""
        learned = len(self.slot_task_)
        if not learned:
            return None
        n = max(learned, NNS_MIN_SLOTS)
        alphas = torch.full((n,), 1.0 / n, device=x.device)
        self.net_.eval()
        g = -self.net_.alpha_gradients(x, alphas, entropy).mean(0)  # (n,)
        if float(g.softmax(0).max()) >= self.nns_threshold / n:
            return int(g[:learned].argmax())
        return None

    def _slot_scores(self, slot: int) -> list[torch.nn.Parameter]:
        return [layer.scores[str(slot)] for layer in self.net_.masked_layers()]

    def _state(self) -> dict[str, torch.Tensor]:
        return super()._state() | {"nns": torch.tensor([self.nns_steps_, self.nns_slot_])}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        nns = state.pop("nns", torch.zeros(2, dtype=torch.long))  # none in a GG checkpoint
        self.nns_steps_, self.nns_slot_ = nns.tolist()
        super()._load_state(state)

    # -- task inference ---------------------------------------------------------------------
    @property
    def uses_batch_information(self) -> bool:
        return self.per_batch

    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        return self._logits(split, ctx, self._infer_slots(split, ctx))

    def infer_task(self, split: Split, ctx: Context) -> np.ndarray:
        """(N,) inferred task ids (NNs: the task during which the inferred mask was allocated)."""
        return np.asarray(self.slot_task_)[self._infer_slots(split, ctx)]

    def _infer_slots(self, split: Split, ctx: Context) -> np.ndarray:
        if not self.per_batch:  # per sample (several processes: rows split, then gathered)
            view = Applied(self.net_, lambda x: self._infer(x, joint=False)[:, None].float())
            found = predict_batches(view, lambda p: self.backbone.preprocess(split, p),
                                    len(split), ctx)  # (N, 1)
            return found.flatten().long().numpy()
        bs, slots = self.batch_size, np.zeros(len(split), dtype=np.int64)
        self.net_.to(ctx.device).eval()
        for start in range(0, len(split), bs):  # official protocol: one slot per test batch
            pos = np.arange(start, min(len(split), start + bs))
            x = self._images(split, pos, ctx)[: self.examples]
            slots[pos] = self._infer(x, joint=True).cpu().numpy()  # (1,)
        return slots

    def _infer(self, x: torch.Tensor, joint: bool) -> torch.Tensor:
        """Slot per sample (B,), or one slot (1,) for the mean objective of the batch."""
        learned = len(self.slot_task_)
        alive = torch.ones(1 if joint else len(x), learned, dtype=torch.bool, device=x.device)
        rounds = 1 if self.inference == "oneshot" else math.ceil(math.log2(learned)) + 1
        for _ in range(rounds):
            if (alive.sum(1) == 1).all():
                break
            for pattern in alive.unique(dim=0):
                if pattern.sum() == 1:
                    continue
                rows = (alive == pattern).all(1)  # samples whose candidates are `pattern`
                alphas = pattern.float() / pattern.sum()  # (T,)
                g = self.net_.alpha_gradients(x if joint else x[rows], alphas, self._objective())
                g = g.mean(0, keepdim=True) if joint else g  # (b, T)
                alive[rows] = self._survivors(g, pattern)
        return alive.float().argmax(1)  # the (first) surviving slot

    def _survivors(self, g: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        """One-shot: the argmin; binary: the candidates with g <= their median."""
        g = g.masked_fill(~pattern, float("inf"))  # never an unlearned or dropped slot
        if self.inference == "oneshot":
            return F.one_hot(g.argmin(1), len(pattern)).bool()
        median = g[:, pattern].median(1, keepdim=True).values  # lower median (torch, official)
        return (g <= median) & pattern

    def _objective(self):
        if self.objective == "entropy":
            return entropy
        real = self.num_classes_ if self.mode == "NNs" else max(map(len, self.slot_classes_))
        return superfluous_logsumexp(real)
