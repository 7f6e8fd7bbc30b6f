"""The one epoch loop, and the classifier training/prediction shared by the baselines.

``fit`` is an explicit loop (nanoGPT style): SGD with momentum and a cosine schedule to 0, as
LAMDA-PILOT's learners use; the caller supplies how a batch of positions becomes an input. The
schedule steps once per epoch (``schedule_unit="epoch"``, as LAMDA-PILOT and the official codes
of RanPAC, APER, EASE, SLCA, LayUP, ... step ``CosineAnnealingLR(T_max=epochs)``: epoch e of E
runs at lr·(1 + cos(πe/E))/2, the first at the full rate) or once per batch (``"step"``: the
cosine runs over every step of the run).

The helpers at the bottom train and query the network of a classic baseline (``finetune`` and
its subclasses ``lwf``, ``ewc``, ``icarl``, ``replay``, ``joint``): a method ``m`` with
``net_`` (a backbone copy, None when frozen), ``head_`` and the optimiser settings ``epochs``,
``lr``, ``batch_size``, ``weight_decay``, ``momentum``. These baselines have no single official
code; their cosine steps per batch (a 1-epoch run still decays).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .backbones import Backbone
from .context import Context
from .datasets.base import Split
from .layers.distill import Carry, kd_loss
from .transforms import Augment

Inputs = Callable[[np.ndarray], torch.Tensor]
Shard = Literal["loss", "outputs", "replicate"]  # how ranks split a batch: backward_share
ScheduleUnit = Literal["epoch", "step"]  # when a learning-rate schedule steps


def fit(model: nn.Module, inputs: Inputs, targets: torch.Tensor, ctx: Context, *, epochs: int,
        lr: float | None = None, batch_size: int, weight_decay: float = 0.0,
        momentum: float = 0.9, generator: torch.Generator, loss_fn: Callable | None = None,
        desc: str = "train", optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        schedule_unit: ScheduleUnit = "epoch", clip_grad: float | None = None,
        shard: Shard = "loss") -> list[float]:
    """Train ``model``'s trainable parameters; returns the mean loss of each epoch.

    ``inputs(pos)`` gives a tensor or a tuple of tensors (then ``model(*x)``, e.g. images and
    their queries for prompt methods); ``loss_fn(output, y)``. ``clip_grad``: clip the global
    gradient norm to this value before each step (None: no clipping).

    Give ``lr`` (SGD over the trainable parameters, cosine to 0), or your own ``optimizer``
    (e.g. parameter groups with their own learning rates; ``weight_decay`` and ``momentum`` are
    then its own) with an optional ``scheduler`` (None: constant rates). ``schedule_unit``: the
    schedule steps after every epoch ("epoch"; the default cosine then spans ``epochs``) or after
    every batch ("step"; it spans every step of the run).

    Several processes (``ctx.dist``, torchrun): ``batch_size`` is the global batch. Every rank
    draws the same permutation and builds the same global batch (``inputs(pos)``: so random
    augmentation draws are those of one process), computes the loss of its contiguous share
    weighted by the share's fraction of the batch, and the gradients are summed across ranks
    before the clip and the step: one step of N ranks x b equals one process with N·b for any
    loss that is a per-sample mean plus batch-independent terms (``shard``: see
    ``backward_share`` for losses that couple the samples of a batch).
    """
    if schedule_unit not in ("epoch", "step"):
        raise ValueError(f"schedule_unit must be 'epoch' or 'step', got {schedule_unit!r}")
    loss_fn = loss_fn or F.cross_entropy
    n = len(targets)
    horizon = epochs if schedule_unit == "epoch" else epochs * math.ceil(n / batch_size)
    opt, sched = _optimizer(model, horizon, lr, weight_decay, momentum, optimizer, scheduler)
    model.to(ctx.device).train()
    losses = []
    bar = progress_bar(ctx, epochs * n, desc)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator).numpy()
        total = 0.0
        for start in range(0, n, batch_size):
            pos = perm[start : start + batch_size]
            bar.update(len(pos))
            opt.zero_grad(set_to_none=True)
            total += backward_share(model, loss_fn, inputs(pos), targets[pos], ctx,
                                    [p for g in opt.param_groups for p in g["params"]],
                                    shard) * len(pos)
            if clip_grad is not None:
                nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                         clip_grad)
            opt.step()
            if sched is not None and schedule_unit == "step":
                sched.step()
        if sched is not None and schedule_unit == "epoch":
            sched.step()
        losses.append(ctx.dist.sum(total) / n)
    bar.close()
    ctx.dist.same_state(model, generator)
    model.eval()
    return losses


def backward_share(model: Callable, loss_fn: Callable, x, y: torch.Tensor, ctx: Context,
                   params, shard: Shard = "loss") -> float:
    """Backward of one global batch ``(x, y)`` (on the CPU; ``x`` a tensor or tuple of
    tensors) through ``loss_fn(model(x), y)``, shared across ranks: after it, the gradients of
    ``params`` on every rank are those of one process on the whole batch. Returns this rank's
    part of the batch's loss (its sum over ranks is the batch's loss; in one process, the loss).

    ``shard`` says how the ranks split the batch:
    - "loss": each rank runs its contiguous share of the rows, its loss weighted by its share
      of the batch, gradients summed. Exact when the loss is a per-sample mean plus
      batch-independent terms (cross-entropy, distillation, weight penalties).
    - "outputs": each rank runs the model on its share; the outputs are gathered (gradients
      flow back to each rank's own rows) and every rank computes the loss of the whole batch.
      Exact for any loss of the batch's outputs (in-batch contrast, B x B similarities);
      not for models whose forward couples samples (BatchNorm in training mode), and a term
      of the parameters alone (a weight penalty) would count N times: add it in "loss" mode.
    - "replicate": every rank computes the whole batch, at weight 1/N. Exact whatever the
      model draws per batch (dropout masks of the batch's shape), no gain in speed: for small
      heads on cached features.
    """
    if shard not in ("loss", "outputs", "replicate"):
        raise ValueError(f"shard must be 'loss', 'outputs' or 'replicate', got {shard!r}")
    dist, whole = ctx.dist, y
    if shard == "replicate":
        share = 1.0 / dist.world_size
    else:
        x, y, share = dist.batch_share(x, y)  # this rank's rows (all rows in one process)
    gather = shard == "outputs" and dist.active and len(y) < len(whole)
    x, y = _to(x, ctx.device), y.to(ctx.device)
    out = model(*x) if isinstance(x, tuple) else model(x)
    if gather:  # the whole batch's outputs on every rank, each rank's gradient to its rows
        out = tuple(map(dist.gather_with_grad, out)) if isinstance(out, tuple) else \
            dist.gather_with_grad(out)
        y, share = whole.to(ctx.device), 1.0
    loss = loss_fn(out, y)
    (loss * share if share != 1.0 else loss).backward()
    dist.reduce_gradients(params)
    return float(loss.detach()) * (1.0 / dist.world_size if gather else share)


def progress_bar(ctx: Context, images: int, desc: str) -> tqdm:
    """A bar over every image of every epoch, with images per second (off unless
    ``ctx.progress``): a one-epoch task moves batch by batch, not 0/1 then 1/1."""
    return tqdm(total=images, desc=desc, unit="img", unit_scale=True, leave=False,
                disable=not ctx.progress, dynamic_ncols=True)


def _to(x, device):
    return tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)


def _optimizer(model, steps, lr, weight_decay, momentum, optimizer, scheduler):
    """The caller's (optimizer, scheduler), or SGD + cosine over ``steps`` (epochs or batches)
    at ``lr``."""
    if (lr is None) == (optimizer is None):
        raise ValueError("fit needs exactly one of lr (default SGD + cosine) or optimizer")
    if optimizer is not None:
        return optimizer, scheduler
    if scheduler is not None:
        raise ValueError("fit: a scheduler needs its optimizer")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)


def image_inputs(backbone: Backbone, split: Split, *, augment: Augment | None = None,
                 generator: torch.Generator | None = None) -> Inputs:
    """Positions -> preprocessed images of ``split`` (B, 3, S, S); with ``augment``, training
    views drawn from ``generator`` (random resized crop of the original image + flip)."""
    return lambda pos: backbone.preprocess(split, pos, augment, generator)


def feature_inputs(features: torch.Tensor) -> Inputs:
    """Positions -> rows of precomputed features (B, D)."""
    return lambda pos: features[torch.from_numpy(pos)]


@torch.no_grad()
def predict_batches(model: nn.Module, inputs: Inputs, n: int, ctx: Context) -> torch.Tensor:
    """Outputs of ``model`` on all ``n`` inputs, in order, batch by batch, on the CPU (the first
    output where the model returns a tuple, e.g. (logits, auxiliary loss))."""
    model.to(ctx.device).eval()
    out = []
    mine = ctx.dist.shard(n, ctx.batch_size)  # several processes: whole batches, gathered
    for start in range(mine.start, mine.stop, ctx.batch_size):
        pos = np.arange(start, min(mine.stop, start + ctx.batch_size))
        x = _to(inputs(pos), ctx.device)
        y = model(*x) if isinstance(x, tuple) else model(x)
        out.append((y[0] if isinstance(y, tuple) else y).float().cpu())  # the logits
    local = torch.cat(out) if out else None
    return ctx.dist.gather_rows(local) if ctx.dist.active else \
        (local if local is not None else torch.zeros(0))


def task_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, classes) -> torch.Tensor:
    """Cross-entropy where only ``classes`` (the current task's) compete: every other logit is
    set to -inf (L2P, DualPrompt, CODA-Prompt and DAP train this way; old rows get no gradient).
    """
    keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    keep[list(classes)] = True
    return F.cross_entropy(logits.masked_fill(~keep, float("-inf")), targets)


def distill_loss(logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor, classes,
                 kd_weight: float, temperature: float) -> torch.Tensor:
    """CE over ``classes`` (None: every class) + λ_kd · KD of the first ``old`` logits (B, old)
    towards the teacher's (B, old); the KD term is absent while there is no old class (LwF,
    iCaRL)."""
    ce = F.cross_entropy(logits, y) if classes is None else task_cross_entropy(logits, y, classes)
    old = teacher.shape[1]
    if not old:
        return ce
    return ce + kd_weight * kd_loss(logits[:, :old], teacher, temperature)


def query_inputs(backbone: Backbone, split: Split, ctx: Context, *,
                 augment: Augment | None = None, generator: torch.Generator | None = None
                 ) -> Inputs:
    """Positions -> (images (B, 3, S, S), queries (B, D)), the query being the frozen
    backbone's feature of the very image the model sees. Without augmentation the queries are
    the cached features of ``split`` (no extra pass); with it, one frozen no-grad pass on the
    augmented batch (what L2P-style training costs: 1F per epoch)."""
    cached = None if augment is not None else ctx.features(backbone, split)  # (N, D)

    def inputs(pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = backbone.preprocess(split, pos, augment, generator)  # (B, 3, S, S)
        if cached is not None:
            return x, cached[torch.from_numpy(pos)]
        with torch.no_grad():
            q = backbone.model.to(ctx.device).eval()(x.to(ctx.device)).float()  # (B, D)
        return x, q

    return inputs


# -- the classic baselines' network: backbone copy (or none, if frozen) + head ----------------
def network(m) -> nn.Module:
    """The model ``m`` trains: its head alone (frozen backbone, on cached features) or
    backbone copy + head."""
    return m.head_ if m.net_ is None else nn.Sequential(m.net_, m.head_)


def inputs_of(m, split: Split, ctx: Context) -> Inputs:
    """Positions of ``split`` -> what ``network(m)`` takes: cached features or images."""
    if m.net_ is None:
        return feature_inputs(ctx.features(m.backbone, split))
    return image_inputs(m.backbone, split)


def teacher_logits(m, inputs: Inputs, n: int, ctx: Context) -> torch.Tensor:
    """(n, old) logits of the network as it is now (before the head grows): the teacher."""
    if m.head_.num_classes == 0:
        return torch.zeros(n, 0)
    return predict_batches(network(m), inputs, n, ctx)


def features_of(m, split: Split, ctx: Context) -> torch.Tensor:
    """(len(split), D) features of the current network (the backbone's, cached, if frozen)."""
    if m.net_ is None:
        return ctx.features(m.backbone, split)
    return predict_batches(m.net_, image_inputs(m.backbone, split), len(split), ctx)


def carrying(inputs: Inputs, extra: torch.Tensor) -> Inputs:
    """Positions -> (inputs, extra rows): a per-sample tensor travels with the batch."""
    return lambda pos: (inputs(pos), extra[torch.from_numpy(pos)])


def fit_with(m, inputs: Inputs, targets, ctx: Context, generator: torch.Generator,
             loss_fn: Callable) -> list[float]:
    """Train ``network(m)`` with ``m``'s optimiser settings; ``inputs(pos)`` gives (x, extra)
    and ``loss_fn((logits, extra), y)``."""
    if m.net_ is not None:
        m.net_.requires_grad_(True)
    return fit(Carry(network(m)), inputs, torch.as_tensor(targets), ctx, epochs=m.epochs,
               lr=m.lr, batch_size=m.batch_size, weight_decay=m.weight_decay,
               momentum=m.momentum, generator=generator, loss_fn=loss_fn, desc=f"{m.name} task",
               schedule_unit="step")


def train(m, split: Split, ctx: Context, generator: torch.Generator) -> list[float]:
    """Train ``m.net_`` (unless frozen) and ``m.head_`` with cross-entropy on ``split``."""
    targets = torch.from_numpy(split.targets)
    if m.net_ is None:
        model, inputs = m.head_, feature_inputs(ctx.features(m.backbone, split))
    else:
        model, inputs = nn.Sequential(m.net_, m.head_), image_inputs(m.backbone, split)
        m.net_.requires_grad_(True)
    return fit(model, inputs, targets, ctx, epochs=m.epochs, lr=m.lr, batch_size=m.batch_size,
               weight_decay=m.weight_decay, momentum=m.momentum, generator=generator,
               desc=f"{m.name} task", schedule_unit="step")


def predict(m, split: Split, ctx: Context) -> torch.Tensor:
    """(len(split), C) logits of ``m.head_`` on the features of ``m.net_`` (or, if frozen, the
    cached backbone features), in order."""
    if m.net_ is None:
        feats = ctx.features(m.backbone, split)
        return predict_batches(m.head_, feature_inputs(feats), len(split), ctx)
    model = nn.Sequential(m.net_, m.head_)
    return predict_batches(model, image_inputs(m.backbone, split), len(split), ctx)


def load_prefixed(module: nn.Module, state: dict[str, torch.Tensor], prefix: str) -> None:
    """Load into ``module`` the entries of ``state`` whose keys start with ``prefix`` (stripped),
    strictly: every key of ``module`` must be there."""
    module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


@contextlib.contextmanager
def seeded(generator: torch.Generator, device: torch.device):
    """Global RNG draws inside (dropout, drop-path, timm's initialisation) seeded from
    ``generator``, so a run is reproducible and resumable; the caller's RNG state (CPU, and the
    CUDA device in use) is restored afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        yield
