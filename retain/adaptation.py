"""First-session adaptation (APER, RanPAC, LayUP): tune the pre-trained network on the first
task with a cosine head, then freeze it for good (Zhou et al., IJCV 2024, §4; McDonnell et al.,
NeurIPS 2023, phase 1; Ahrens et al., TMLR 2024, "FSA").

The adapted network becomes a new frozen ``Backbone`` whose identity is the hash of its weights,
so the feature cache keeps its features apart from the pre-trained ones. ``peft`` chooses what
is tuned: ``finetune`` (every weight), or a parameter-efficient module injected into timm's ViT
(``adapter``, ``ssf``, ``vpt_shallow``, ``vpt_deep``; see ``retain.layers.peft``).

Two recipes (``recipe``):

* ``"sgd"`` (APER, RanPAC, as LAMDA-PILOT): SGD with momentum, cosine to 0 stepped once per
  epoch (``retain.training.fit``'s default; ``schedule_unit="step"``: after every batch), a
  cosine head whose σ is learned from 1, weights ~ U(±1/√D) (PILOT's ``CosineLinear``; before
  2026-12 retain drew N(0, 0.02²): the same row norm in expectation, other directions);
* ``"layup"`` (LayUP ``main.py::fsa``): AdamW (one rate and weight decay for the tuned module
  and the head), ``CosineLinear(sigma=30)`` with σ fixed and weights ~ U(±1/√D), and
  ``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch (here a per-epoch factor stepped
  after every batch, ``retain.layers.schedules.epoch_cosine``: epoch e runs at
  lr·½(1 + cos(π e / E))).

Augmentation: RandomResizedCrop with ``crop_scale`` and a horizontal flip (``Augment``), then
an optional ``ColorJitter(color_jitter)`` on brightness, contrast, saturation and hue (LayUP:
scale (0.7, 1), jitter 0.1).
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from torch import nn

from .backbones import Backbone, sha256_state
from .context import Context
from .datasets.base import Split
from .errors import ConfigError
from .layers.heads import CosineHead
from .layers.schedules import epoch_cosine
from .training import ScheduleUnit, fit, image_inputs
from .transforms import Augment, ColorJitter

Peft = Literal["finetune", "adapter", "ssf", "vpt_shallow", "vpt_deep"]
Recipe = Literal["sgd", "layup"]


def attach(model: nn.Module, peft: Peft, **options) -> nn.Module:
    """Inject the ``peft`` module into ``model`` (in place); return the module to train."""
    if peft == "finetune":
        return model
    from .layers import peft as P

    return P.attach(model, peft, **options)


def adapted_backbone(base: Backbone, model: nn.Module, peft: str) -> Backbone:
    """A frozen Backbone for ``model`` (an adapted copy of ``base.model``)."""
    model.requires_grad_(False).eval()
    ident = dict(base.identity, name=f"{base.name}+{peft}", sha256=sha256_state(model),
                 adapted_from=base.identity.get("sha256"), peft=peft)
    return Backbone(f"{base.name}+{peft}", model, base.feature_dim, base.preprocess, ident)


def adapt_first_session(base: Backbone, train: Split, classes: tuple[int, ...], ctx: Context, *,
                        peft: Peft, epochs: int, lr: float, batch_size: int, weight_decay: float,
                        momentum: float = 0.9, augment: bool = True,
                        schedule_unit: ScheduleUnit = "epoch",
                        generator: torch.Generator, options: dict | None = None,
                        recipe: Recipe = "sgd", crop_scale: tuple[float, float] = (0.05, 1.0),
                        color_jitter: float = 0.0) -> tuple[Backbone, nn.Module]:
    """Tune a copy of ``base.model`` on ``train`` (labels ``classes``) with a cosine head and
    cross-entropy, by ``recipe`` (module docstring); returns the frozen adapted backbone and the
    trained module (its state). ``momentum`` and ``schedule_unit`` (when the SGD recipe's cosine
    steps: per epoch as the official APER and RanPAC codes, or per step) are the SGD recipe's
    only."""
    model = copy.deepcopy(base.model)
    model.requires_grad_(False)
    tuned = attach(model, peft, **(options or {}))
    tuned.requires_grad_(True)
    head = _head(recipe, base.feature_dim, len(classes), generator)
    offset = torch.tensor(min(classes))
    inputs = _inputs(base, train, crop_scale, color_jitter, generator) if augment else \
        image_inputs(base, train)  # (B, 3, S, S)
    targets = torch.from_numpy(train.targets) - offset
    net, desc = nn.Sequential(model, head), f"adapt ({peft})"
    if recipe == "sgd":
        fit(net, inputs, targets, ctx, epochs=epochs, lr=lr, batch_size=batch_size,
            weight_decay=weight_decay, momentum=momentum, generator=generator,
            schedule_unit=schedule_unit, desc=desc)
    else:
        trainable = [p for p in net.parameters() if p.requires_grad]  # σ is not
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
        sched = epoch_cosine(opt, epochs, math.ceil(len(targets) / batch_size))
        fit(net, inputs, targets, ctx, epochs=epochs, batch_size=batch_size, optimizer=opt,
            scheduler=sched, schedule_unit="step", generator=generator, desc=desc)
    return adapted_backbone(base, model, peft), tuned


def _head(recipe: Recipe, dim: int, num_classes: int, generator: torch.Generator) -> CosineHead:
    """The temporary cosine head of the first session (module docstring)."""
    if recipe == "sgd":
        head = CosineHead(dim, num_classes)  # σ learned from 1
    else:
        head = CosineHead(dim, num_classes, learn_sigma=False, sigma=30.0)
    bound = 1.0 / math.sqrt(dim)  # CosineLinear.reset_parameters (PILOT, RanPAC, LayUP)
    nn.init.uniform_(head.weight, -bound, bound, generator=generator)
    return head


def _inputs(base: Backbone, train: Split, crop_scale: tuple[float, float], color_jitter: float,
            generator: torch.Generator):
    """Training views: RandomResizedCrop of the original image with ``crop_scale`` and a flip
    (``Augment``), then colour jitter when ``color_jitter`` > 0 (on the [0, 1] pixels)."""
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ConfigError(f"crop_scale = {crop_scale!r}: give 0 < low <= high <= 1 (the area "
                          f"fraction RandomResizedCrop keeps)")
    crop = Augment(scale=(float(crop_scale[0]), float(crop_scale[1])))
    views = image_inputs(base, train, augment=crop, generator=generator)  # (B, 3, S, S)
    if color_jitter == 0:
        return views
    pre = base.preprocess
    jitter = ColorJitter(color_jitter, tuple(pre.mean), tuple(pre.std))
    return lambda pos: jitter(views(pos), generator)


def restore_adapted(base: Backbone, peft: Peft, state: dict[str, torch.Tensor],
                    options: dict | None = None) -> tuple[Backbone, nn.Module]:
    """Rebuild an adapted backbone from the state of its trained module."""
    model = copy.deepcopy(base.model)
    tuned = attach(model, peft, **(options or {}))
    tuned.load_state_dict(state)
    return adapted_backbone(base, model, peft), tuned


def adapt_for(method, task, ctx: Context, options: dict | None = None, **recipe
              ) -> tuple[Backbone, nn.Module | None]:
    """First-session adaptation with a method's own hyper-parameters (``peft``, ``epochs``,
    ``lr``, ``batch_size``, ``weight_decay``, ``momentum``, ``augment``, ``schedule_unit``;
    ``recipe``: keywords ``recipe``, ``crop_scale``, ``color_jitter`` of
    ``adapt_first_session``); the pre-trained backbone and no trained module when ``peft`` is
    'none' or ``epochs`` is 0."""
    if method.peft == "none" or method.epochs == 0:
        return method.backbone, None
    return adapt_first_session(
        method.backbone, task.train, task.classes, ctx, peft=method.peft, epochs=method.epochs,
        lr=method.lr, batch_size=method.batch_size, weight_decay=method.weight_decay,
        momentum=method.momentum, augment=method.augment,
        schedule_unit=method.schedule_unit, generator=ctx.generator(0, 9),
        options=options, **recipe)


def tuned_state(tuned: nn.Module | None) -> dict[str, torch.Tensor]:
    """The trained module's tensors under the prefix ``tuned.`` (nothing without one)."""
    return {} if tuned is None else {f"tuned.{k}": v for k, v in tuned.state_dict().items()}


def load_tuned(base: Backbone, peft: str, state: dict[str, torch.Tensor],
               options: dict | None = None) -> tuple[Backbone, nn.Module | None]:
    """The adapted backbone saved by ``tuned_state``, or ``base`` when nothing was trained."""
    tuned = {k[6:]: v for k, v in state.items() if k.startswith("tuned.")}
    if not tuned:
        return base, None
    return restore_adapted(base, peft, tuned, options)
