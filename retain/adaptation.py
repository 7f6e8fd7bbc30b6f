"""First-session adaptation (APER, RanPAC, LayUP): tune the pre-trained network on the first
task with a cosine head, then freeze it for good (Zhou et al., IJCV 2024, §4; McDonnell et al.,
NeurIPS 2023, phase 1; Ahrens et al., TMLR 2024, "FSA").

The adapted network becomes a new frozen ``Backbone`` whose identity is the hash of its weights,
so the feature cache keeps its features apart from the pre-trained ones. ``peft`` chooses what
is tuned: ``finetune`` (every weight), or a parameter-efficient module injected into timm's ViT
(``adapter``, ``ssf``, ``vpt_shallow``, ``vpt_deep``; see ``retain.layers.peft``).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from .backbones import Backbone, sha256_state
from .context import Context
from .datasets.base import Split
from .layers.heads import CosineHead
from .training import ScheduleUnit, fit, image_inputs
from .transforms import Augment

Peft = Literal["finetune", "adapter", "ssf", "vpt_shallow", "vpt_deep"]


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
                        generator: torch.Generator, options: dict | None = None
                        ) -> tuple[Backbone, nn.Module]:
    """Tune a copy of ``base.model`` on ``train`` (labels ``classes``) with a cosine head and
    cross-entropy, SGD with a cosine schedule stepped per ``schedule_unit`` (the official APER,
    RanPAC and LayUP codes: per epoch); returns the frozen adapted backbone and the trained
    module (its state)."""
    model = copy.deepcopy(base.model)
    model.requires_grad_(False)
    tuned = attach(model, peft, **(options or {}))
    tuned.requires_grad_(True)
    head = CosineHead(base.feature_dim, len(classes))
    nn.init.normal_(head.weight, std=0.02, generator=generator)
    offset = torch.tensor(min(classes))
    inputs = image_inputs(base, train, augment=Augment() if augment else None,
                          generator=generator)  # (B, 3, S, S)
    targets = torch.from_numpy(train.targets) - offset
    fit(nn.Sequential(model, head), inputs, targets, ctx, epochs=epochs, lr=lr,
        batch_size=batch_size, weight_decay=weight_decay, momentum=momentum,
        generator=generator, schedule_unit=schedule_unit, desc=f"adapt ({peft})")
    return adapted_backbone(base, model, peft), tuned


def restore_adapted(base: Backbone, peft: Peft, state: dict[str, torch.Tensor],
                    options: dict | None = None) -> tuple[Backbone, nn.Module]:
    """Rebuild an adapted backbone from the state of its trained module."""
    model = copy.deepcopy(base.model)
    tuned = attach(model, peft, **(options or {}))
    tuned.load_state_dict(state)
    return adapted_backbone(base, model, peft), tuned


def adapt_for(method, task, ctx: Context, options: dict | None = None
              ) -> tuple[Backbone, nn.Module | None]:
    """First-session adaptation with a method's own hyper-parameters (``peft``, ``epochs``,
    ``lr``, ``batch_size``, ``weight_decay``, ``momentum``, ``augment``, ``schedule_unit``); the
    pre-trained backbone and no trained module when ``peft`` is 'none' or ``epochs`` is 0."""
    if method.peft == "none" or method.epochs == 0:
        return method.backbone, None
    return adapt_first_session(
        method.backbone, task.train, task.classes, ctx, peft=method.peft, epochs=method.epochs,
        lr=method.lr, batch_size=method.batch_size, weight_decay=method.weight_decay,
        momentum=method.momentum, augment=method.augment,
        schedule_unit=method.schedule_unit, generator=ctx.generator(0, 9), options=options)


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
