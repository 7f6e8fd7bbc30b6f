"""DEN: Lifelong Learning with Dynamically Expandable Networks (Yoon et al., ICLR 2018, arXiv
1708.01547; official TensorFlow code jaehong31/DEN @52ebb5d ``DEN.py``; spec
architecture-methods §3).

An MLP (ReLU) whose hidden layers grow, with one head per task (the task id is given at test).
Task 0 trains the whole network. Every later task t:

1. Selective retraining: (a) the new head alone trains with L1, so it becomes sparse; (b) the
   units linked to it by non-zero weights are selected breadth-first from the top (all inputs
   kept); (c) only that sub-network trains (unselected units leave the forward pass), with
   drift_reg/2 ||theta_S - theta_S^{t-1}||^2, and is written back.
2. Dynamic expansion, if the last minibatch loss of (c) is >= ``loss_threshold``: every hidden
   layer gets ``expand_units`` new units, wired from the whole layer below and to the whole layer
   above; they and the current head train with the old trunk frozen, with L1 and group-lasso
   (per column) proximal steps; new units whose incoming weights are all zero are deleted.
3. Split and duplication: old units whose incoming weights drifted by rho = ||w - w^{t-1}||_2 >
   ``split_threshold`` (at most ``expand_units`` per layer) get their t-1 weights back, and a copy
   with the new weights is appended; then the whole network trains, the old slice pulled to
   theta^{t-1}.
4. Timestamp: the hidden widths. Units are only ever appended, so task t later runs the first
   stamp_t units of each layer and its own head: growth never changes its sub-network's shape.
   Old tasks see drift only through steps 1(c) and 3 (regularised, restored where large).

Every phase: loss + l2/2 ||theta||^2 (+ drift term), Adam with the learning rate decayed x0.95 per
epoch, each step a fresh random minibatch, then an L1 soft threshold ``l1`` on every trained tensor
(and the group threshold on the new units). Defaults are ``DEN_run.py``'s (784-312-128, 4300 steps
of 256 per phase, sigmoid cross-entropy, lambdas 1e-5 / 1e-4 / 1e-3, drift 0.5, k 10, tau 0.01,
sigma 0.05). The code's thresholds are constant while the learning rate decays per epoch: on its
55k images 4300 steps are 20 epochs (lr still x0.36), but on a small set (MNIST-5k: 275 epochs,
lr ~0) the constant L1 zeroes the whole network. ``scale_prox`` (default) scales both thresholds
by lr_t / lr, as a proximal step with a decaying step size does (the code at the start of every
phase); ``scale_prox=False`` is the code. The demo feeds [0, 1] pixels (backbone ``pixels01``);
``pixels`` standardises them, which changes the drift norms and so the split/expansion choices.

Where this differs from the official code (spec §3.7), on purpose: step 1(a) runs steps/10 Adam
steps (the code starts its counter at the stop value: one update, nearly every unit selected);
selection reads every output of the head, and heads are as wide as the task's classes (the code
reads head column 0 only, written for binary one-vs-rest tasks); any number of hidden layers (the
code hard-codes two, and a 10-class timestamp); split takes the *most* drifted candidates (the
code keeps the least drifted) and runs after every selective retraining, as the paper's
Algorithm 1 (the code splits only after an expansion); a split gives only the chosen units their
t-1 bias back, and a copy keeps the unit's current outgoing weights and bias (the code restores
the t-1 biases of *every* old unit, its ``prev_W_split``, gives the current head random rows and
the copies U(0, 1) biases); no validation early stop (the code's test on a 10-point moving
average changing by < 1e-6 practically never fires). DEN's own metric, mean per-class AUROC
(``retain.metrics.mean_class_auroc``), is ``DEN.auroc``. Prox steps, unit selection / deletion /
duplication: ``retain/layers/sparse.py``.

Under torchrun: each step's global minibatch is split by ``training.backward_share`` ("loss"
mode; decay and drift terms weighted by share), so the proximal steps act on identical tensors;
expansion (the global batch's last data loss), selection, split and dead-unit deletion are
decided on rank 0's values and broadcast. No BatchNorm.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np
import torch

from ..context import Context
from ..datasets.base import Split
from ..errors import ConfigError
from ..features import FeatureCache
from ..layers import sparse
from ..layers.sparse import Head, forward, glorot, leaves
from ..metrics import mean_class_auroc
from ..params import Interval
from ..scenarios.base import Task
from .base import ANY_BACKBONE, GROWS, TASK_ID_AT_TEST, Method, Needs, count, register_method

NEG = -1e9  # logits of classes outside the sample's task


def _ctx(data) -> Context:
    """The run's context, on the CPU where DEN computes: data = (x, y, generator, context), or
    one process where (x, y, generator) has none."""
    return data[3] if len(data) > 3 else Context(device="cpu", cache=FeatureCache())


@register_method("den")
class DEN(Method):
    paper = "Yoon et al., ICLR 2018 (arXiv 1708.01547)"
    tags = frozenset({TASK_ID_AT_TEST, GROWS})
    needs = Needs(ANY_BACKBONE)  # raw pixels or any features
    constraints = {"steps": Interval(1, None), "batch_size": Interval(1, None),
                   "lr": Interval(0, None, "neither"), "lr_decay": Interval(0, 1, "right"),
                   "l1": Interval(0, None), "l2": Interval(0, None),
                   "group_lasso": Interval(0, None), "drift_reg": Interval(0, None),
                   "expand_units": Interval(0, None), "loss_threshold": Interval(0, None),
                   "split_threshold": Interval(0, None)}

    def __init__(self, backbone, *, hidden: tuple[int, ...] = (312, 128), steps: int = 4300,
                 batch_size: int = 256, lr: float = 1e-3, lr_decay: float = 0.95,
                 l1: float = 1e-5, l2: float = 1e-4, group_lasso: float = 1e-3,
                 drift_reg: float = 0.5, expand_units: int = 10, loss_threshold: float = 0.01,
                 split_threshold: float = 0.05, loss: Literal["bce", "ce"] = "bce",
                 scale_prox: bool = True):
        super().__init__(backbone)
        self.hidden = hidden  # initial hidden widths
        self.steps = steps  # Adam steps per phase (official max_iter)
        self.batch_size = batch_size
        self.lr = lr
        self.lr_decay = lr_decay  # per epoch of the task's data, staircase
        self.l1 = l1  # L1 soft threshold after every step
        self.l2 = l2  # weight decay, l2/2 ||theta||^2
        self.group_lasso = group_lasso  # group soft threshold on the new units' weights
        self.drift_reg = drift_reg  # drift_reg/2 ||theta_old - theta^{t-1}||^2
        self.expand_units = expand_units  # k: units added (and at most split) per layer
        self.loss_threshold = loss_threshold  # tau: expand when the loss stays >= tau
        self.split_threshold = split_threshold  # sigma: split a unit when its drift > sigma
        self.loss = loss  # bce: sigmoid cross-entropy on one-hot targets (official); ce: softmax
        self.scale_prox = scale_prox  # thresholds x lr_t / lr (False: constant, the code's)
        self.weights_: list[torch.Tensor] = []  # hidden layer l: (in, out)
        self.biases_: list[torch.Tensor] = []  # (out,)
        self.heads_: list[Head] = []  # one per task, over its stamped top width
        self.stamps_: list[tuple[int, ...]] = []  # hidden widths at the end of each task
        self.task_classes_: list[tuple[int, ...]] = []

    # -- learning ---------------------------------------------------------------------------
    def _learn(self, task: Task, ctx: Context) -> None:
        gen = ctx.generator(task.id, 1)
        local = {c: i for i, c in enumerate(task.classes)}
        y = torch.tensor([local[int(c)] for c in task.train.targets])  # (N,)
        data = (self._inputs(task.train), y, gen, replace(ctx, device=torch.device("cpu")))
        if not self.weights_:
            self._init_trunk(data[0].shape[1], gen)
        head = (glorot((self.weights_[-1].shape[1], len(task.classes)), gen),
                glorot((len(task.classes),), gen))
        if not self.heads_:
            trunk = [w.requires_grad_() for w in self.weights_ + self.biases_]
            head = leaves(head)
            self._train([*trunk, *head], lambda x: forward(x, self.weights_, self.biases_, head),
                        data, self.steps)
            self._detach()
        else:
            prev = ([w.clone() for w in self.weights_], [b.clone() for b in self.biases_])
            head, last_loss = self._selective(head, prev, data)
            expand = ctx.dist.broadcast_object(last_loss >= self.loss_threshold)  # rank 0's
            if expand and self.expand_units > 0:
                head = self._expand(head, data)
            head = self._split(head, prev, data)
        self.heads_.append(tuple(t.detach() for t in head))
        self.stamps_.append(tuple(w.shape[1] for w in self.weights_))
        self.task_classes_.append(task.classes)

    def _init_trunk(self, dim: int, gen: torch.Generator) -> None:
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"{self.name}.hidden = {self.hidden!r}: give at least one width >= 1")
        widths = (dim, *self.hidden)
        self.weights_ = [glorot((i, o), gen) for i, o in zip(widths, widths[1:], strict=False)]
        self.biases_ = [glorot((o,), gen) for o in self.hidden]

    def _selective(self, head: Head, prev, data) -> tuple[Head, float]:
        """Train the sparse head, select the units it reaches, retrain only them."""
        head = leaves(head)
        self._train(list(head), lambda x: forward(x, self.weights_, self.biases_, head), data,
                    max(1, self.steps // 10))
        keep = sparse.reachable_units(self.weights_, head[0].detach())  # from every output
        keep = _ctx(data).dist.broadcast_object(keep)  # rank 0's selection
        rows = [torch.arange(self.weights_[0].shape[0]), *keep[:-1]]
        sub_w = leaves(w[r][:, k] for w, r, k in zip(self.weights_, rows, keep, strict=True))
        sub_b = leaves(b[k] for b, k in zip(self.biases_, keep, strict=True))
        sub_h = leaves((head[0][keep[-1]], head[1]))
        old_w = [w[r][:, k] for w, r, k in zip(prev[0], rows, keep, strict=True)]
        old_b = [b[k] for b, k in zip(prev[1], keep, strict=True)]
        penalty = sparse.drift_penalty(sub_w + sub_b, old_w + old_b, self.drift_reg)
        loss = self._train([*sub_w, *sub_b, *sub_h], lambda x: forward(x, sub_w, sub_b, sub_h),
                           data, self.steps, penalty)
        with torch.no_grad():
            for w, b, r, k, sw, sb in zip(self.weights_, self.biases_, rows, keep, sub_w, sub_b,
                                          strict=True):
                w[r[:, None], k[None]], b[k] = sw, sb
            head[0][keep[-1]] = sub_h[0]
        return (head[0].detach(), sub_h[1].detach()), loss

    def _expand(self, head: Head, data) -> Head:
        """Add k units per hidden layer; train them with group sparsity; drop the dead ones."""
        k, gen = self.expand_units, data[2]
        shapes = [w.shape for w in self.weights_]
        bw = leaves(glorot((i, k), gen) for i, _ in shapes)  # old units below -> new units
        bb = leaves(glorot((k,), gen) for _ in shapes)
        tw = leaves(glorot((k, o + k), gen) for _, o in shapes[1:])  # new below -> all units
        hw_new = glorot((k, head[0].shape[1]), gen).requires_grad_()
        head = leaves(head)

        def grown() -> tuple[list[torch.Tensor], list[torch.Tensor], Head]:
            ws = [torch.cat([w, b], 1) for w, b in zip(self.weights_, bw, strict=True)]
            ws = ws[:1] + [torch.cat([w, t], 0) for w, t in zip(ws[1:], tw, strict=True)]
            bs = [torch.cat([b, n]) for b, n in zip(self.biases_, bb, strict=True)]
            return ws, bs, (torch.cat([head[0], hw_new]), head[1])

        self._train([*bw, *bb, *tw, *head, hw_new], lambda x: forward(x, *grown()), data,
                    self.steps, groups=[*bw, *tw])
        with torch.no_grad():
            self.weights_, self.biases_, head = grown()
            for t in [*self.weights_, *self.biases_, head[0]]:  # deaths read from rank 0's
                _ctx(data).dist.broadcast_(t)
            head = (sparse.drop_dead_units(self.weights_, self.biases_, head[0], k), head[1])
        self._detach()
        return tuple(t.detach() for t in head)

    def _split(self, head: Head, prev, data) -> Head:
        """Restore the most drifted old units to their t-1 weights; append copies; retrain."""
        chosen = [sparse.most_drifted(w, p, self.split_threshold, self.expand_units)
                  for w, p in zip(self.weights_, prev[0], strict=True)]
        chosen = _ctx(data).dist.broadcast_object(chosen)  # rank 0's
        if not any(len(c) for c in chosen):
            return head
        hw = sparse.duplicate_units(self.weights_, self.biases_, prev, chosen, head[0])
        head = leaves((hw, head[1]))
        trunk = [t.requires_grad_() for t in self.weights_ + self.biases_]
        penalty = sparse.drift_penalty(trunk, prev[0] + prev[1], self.drift_reg)
        self._train([*trunk, *head], lambda x: forward(x, self.weights_, self.biases_, head),
                    data, self.steps, penalty)
        self._detach()
        return tuple(t.detach() for t in head)

    def _train(self, params, fwd, data, steps, penalty=None, groups=()) -> float:
        """Adam + proximal steps (``sparse.train_prox``); the last minibatch's data loss."""
        return sparse.train_prox(self, params, fwd, data[:3], steps, _ctx(data), penalty, groups)

    def _detach(self) -> None:
        self.weights_ = [w.detach() for w in self.weights_]
        self.biases_ = [b.detach() for b in self.biases_]

    # -- prediction -------------------------------------------------------------------------
    @torch.no_grad()
    def _predict(self, split: Split, ctx: Context, task_ids: np.ndarray) -> torch.Tensor:
        out = torch.full((len(split), self.num_classes_), NEG)
        x = self._inputs(split)
        for t in np.unique(task_ids):
            rows = torch.from_numpy(np.flatnonzero(task_ids == t))
            cols = torch.tensor(self.task_classes_[t])
            out[rows[:, None], cols[None]] = self.task_logits(x[rows], int(t))
        return out

    def task_logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """(B, k) logits of ``task``: the trunk sliced to its timestamp, then its head."""
        if task >= len(self.stamps_):
            raise ValueError(f"{self.name} has not learned task {task}")
        widths = self.stamps_[task]
        ins = (self.weights_[0].shape[0], *widths[:-1])
        ws = [w[:i, :o] for w, i, o in zip(self.weights_, ins, widths, strict=True)]
        bs = [b[:o] for b, o in zip(self.biases_, widths, strict=True)]
        return forward(x, ws, bs, self.heads_[task])

    def auroc(self, split: Split, ctx: Context, task_ids: np.ndarray) -> dict[int, float]:
        """DEN's metric: per task, the mean over its classes of the one-vs-rest ROC AUC of the
        task's own head (``DEN.py::get_performance``)."""
        x, out = self._inputs(split), {}
        for t in np.unique(task_ids):
            rows = np.flatnonzero(task_ids == t)
            with torch.no_grad():
                scores = self.task_logits(x[torch.from_numpy(rows)], int(t)).numpy()
            local = {c: i for i, c in enumerate(self.task_classes_[t])}
            out[int(t)] = mean_class_auroc(scores, [local[int(c)] for c in split.targets[rows]])
        return out

    def _inputs(self, split: Split) -> torch.Tensor:
        pre = self.backbone.preprocess
        chunks = [pre(split, np.arange(s, min(len(split), s + 1024))).flatten(1)
                  for s in range(0, len(split), 1024)]
        return torch.cat(chunks)  # (N, C*S*S)

    # -- state ------------------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        width = max(map(len, self.task_classes_))
        classes = [list(c) + [-1] * (width - len(c)) for c in self.task_classes_]
        state = {"stamps": torch.tensor(self.stamps_), "task_classes": torch.tensor(classes)}
        state |= {f"weight.{i}": w for i, w in enumerate(self.weights_)}
        state |= {f"bias.{i}": b for i, b in enumerate(self.biases_)}
        state |= {f"head.{t}.weight": h[0] for t, h in enumerate(self.heads_)}
        return state | {f"head.{t}.bias": h[1] for t, h in enumerate(self.heads_)}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.stamps_ = [tuple(s) for s in state["stamps"].tolist()]
        self.task_classes_ = [tuple(c for c in r if c >= 0) for r in state["task_classes"].tolist()]
        layers, tasks = len(self.stamps_[0]), len(self.stamps_)
        self.weights_ = [state[f"weight.{i}"] for i in range(layers)]
        self.biases_ = [state[f"bias.{i}"] for i in range(layers)]
        self.heads_ = [(state[f"head.{t}.weight"], state[f"head.{t}.bias"]) for t in range(tasks)]

    def parameter_counts(self) -> dict[str, int]:
        """Every weight is learned: the grown trunk plus all task heads."""
        learned = sum(t.numel() for t in self.weights_ + self.biases_)
        learned += sum(w.numel() + b.numel() for w, b in self.heads_)
        return {"trainable": learned, "total": count(self.backbone.model) + learned}

