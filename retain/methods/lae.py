"""LAE (Gao et al., "A Unified Continual Learning Framework with General Parameter-Efficient
Tuning", ICCV 2023; official code gqk/LAE ``main.py``, ``config/**.yaml``; LAMDA-PILOT
``models/lae.py``, ``backbone/vit_lae.py``, ``utils/inc_net.py::LAE``).

A frozen ViT carries a parameter-efficient module (PET: a compensatory prefix in blocks 0-4,
length 10, by default; or an adapter parallel to attention, or KV-LoRA; see
:mod:`retain.layers.lae`) and a linear head that grows by the new classes of every task (new
rows N(0, 0.001²), biases 0, as the official ``SimpleHead``).

*Learning* (task t): cross-entropy over the current task's classes only (old-class logits are
−∞, so old head rows get no gradient and stay bit-identical). *Calibration*: for t > 0 the PET
is frozen during the first ``num_freeze_epochs`` epochs, so only the head learns, then PET and
head learn together; one Adam (constant rate) is re-created each task. *Accumulation*: an
offline copy of the PET follows the online one by an EMA after every optimizer step,

    θ_off ← α·θ_off + (1 − α)·θ_on,   α = ``ema_decay`` = 0.9999,

from task 1 on, starting from the PET learned on task 0 (official ``ModelEmaV2`` created at the
start of task 1, ``post_train_step``). *Ensemble*: a test image runs the trunk twice (online and
offline PET, same head); p = max(softmax(z_on), softmax(z_off)) element-wise; argmax.
``_predict`` returns log p (same argmax). Per sample; no task id at test.

PILOT differs from the official code (protocol-pitfalls item 35): it freezes the PET in the
first epochs of task 0 too (``calibrate_first_task=True``), creates the offline copy from the
initial PET and runs the EMA in task 0 too (``ema_first_task=True``), and uses batch 128. Both
use Adam at a constant rate (the official ``scheduler.mode: linear`` is never stepped, as
``schedule_unit: none`` sets its horizon to infinity).

PILOT also starts the head's new rows at U(±√(3/D)) (its ``SimpleLinear``), not N(0, 0.001²):
``head_init="pilot"``. With two classes per task and CE over the current classes only, the two
new rows get opposite gradients, so a task's mean logit keeps its initial offset for the whole
task; PILOT's wide start gives tasks random offsets of a few logits, which decide many
last-stage predictions on a stream whose features are nearly collinear (parity benchmark).

Deviations: the prefix slots come first, not after CLS (attention does not depend on key order);
the trunk's own preprocessing/augmentation (``retain.transforms``), not the official
unnormalised torchvision pipeline; ``drop_last`` is not reproduced.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from torch import nn

from ..context import Context
from ..datasets.base import Split
from ..layers.heads import IncrementalLinear
from ..layers.inject import factory_kwargs, frozen_copy, injected, load_without_trunk, without_trunk
from ..layers.lae import (
    AttentionAdapterSet,
    KVLoRASet,
    compensated_prefix,
    ema_update_,
    max_softmax_fusion,
)
from ..params import Interval
from ..scenarios.base import Task
from ..training import fit, image_inputs, predict_batches, task_cross_entropy
from ..transforms import Augment
from .base import VIT_OR_CLIP, Method, Needs, blocks_needed, count, register_method


@register_method("lae")
class LAE(Method):
    paper = "Gao et al., ICCV 2023 (arXiv 2303.10070)"
    constraints = {"prefix_length": Interval(1, None), "adapter_bottleneck": Interval(1, None),
                   "lora_rank": Interval(1, None), "epochs": Interval(0, None),
                   "num_freeze_epochs": Interval(0, None), "lr": Interval(0, None, "neither"),
                   "batch_size": Interval(1, None), "ema_decay": Interval(0, 1)}

    @classmethod
    def requirements(cls, hp: dict) -> list[Needs]:
        return [Needs(VIT_OR_CLIP), Needs(VIT_OR_CLIP, blocks=blocks_needed(hp["blocks"]),
                                          because=f"blocks={hp['blocks']}",
                                          fix="--set params.blocks=[0,1]")]

    def __init__(self, backbone, *, pet: Literal["prefix", "adapter", "lora"] = "prefix",
                 blocks: tuple[int, ...] = (0, 1, 2, 3, 4), prefix_length: int = 10,
                 compensatory: bool = True, adapter_bottleneck: int = 5, lora_rank: int = 5,
                 epochs: int = 5, num_freeze_epochs: int = 3, lr: float = 0.0028125,
                 batch_size: int = 24, ema_decay: float = 0.9999,
                 calibrate_first_task: bool = False, ema_first_task: bool = False,
                 augment: bool = True, head_init: Literal["official", "pilot"] = "official"):
        super().__init__(backbone)
        self.pet = pet  # the PET kind (official pet_cls: Prefix, Adapter, LoRA)
        self.blocks = blocks  # blocks that carry the PET (official adapt_blocks)
        self.prefix_length = prefix_length  # prefix tokens per block (pet=prefix)
        self.compensatory = compensatory  # renormalise the prefix attention (official True)
        self.adapter_bottleneck = adapter_bottleneck  # official down_sample 5
        self.lora_rank = lora_rank  # rank of the LoRA updates (pet=lora)
        self.epochs = epochs
        self.num_freeze_epochs = num_freeze_epochs  # head-only epochs at the start of a task
        self.lr = lr
        self.batch_size = batch_size
        self.ema_decay = ema_decay  # α of the offline PET
        self.calibrate_first_task = calibrate_first_task  # PILOT: True; official: False
        self.ema_first_task = ema_first_task  # PILOT: True; official: False
        self.augment = augment
        self.head_init = head_init  # new rows: official N(0, 0.001²); PILOT U(±√(3/D))
        self.net_: _LAENet | None = None

    # -- building ---------------------------------------------------------------------------
    def _build(self, generator: torch.Generator | None = None) -> _LAENet:
        vit = frozen_copy(self.backbone.model)
        if not self.blocks or not all(0 <= b < len(vit.blocks) for b in self.blocks):
            raise ValueError(f"lae: blocks {self.blocks} for a ViT of {len(vit.blocks)} blocks")
        online = self._make_pet(vit, generator)
        offline = copy.deepcopy(online).requires_grad_(False)
        return _LAENet(vit, online, offline, IncrementalLinear(self.backbone.feature_dim))

    def _make_pet(self, vit: nn.Module, generator: torch.Generator | None) -> nn.Module:
        dim = self.backbone.feature_dim
        if self.pet == "prefix":
            return compensated_prefix(vit, self.blocks, self.prefix_length,
                                      compensatory=self.compensatory, generator=generator)
        if self.pet == "adapter":
            pet = AttentionAdapterSet(self.blocks, dim, self.adapter_bottleneck,
                                      **factory_kwargs(vit))
        else:
            pet = KVLoRASet(self.blocks, dim, self.lora_rank, **factory_kwargs(vit))
        pet.reset_parameters(generator)
        return pet

    # -- learning ---------------------------------------------------------------------------
    def _learn(self, task: Task, ctx: Context) -> None:
        if self.net_ is None:
            self.net_ = self._build(ctx.generator(0, 0))
        net = self.net_
        _expand_head(net.head, task.num_seen, ctx.generator(task.id, 1), self.head_init)
        first = task.id == 0
        if self.epochs:
            frozen = self.num_freeze_epochs if not first or self.calibrate_first_task else 0
            self._train(task, ctx, min(frozen, self.epochs), ema=not first or self.ema_first_task)
        if first and not self.ema_first_task:  # official: the EMA starts from the task-0 PET
            net.offline.load_state_dict(net.online.state_dict())

    def _train(self, task: Task, ctx: Context, frozen_epochs: int, ema: bool) -> None:
        """``frozen_epochs`` head-only epochs, then PET + head; one Adam for both phases, with
        the EMA of the offline PET after every step when ``ema``."""
        net, g = self.net_, ctx.generator(task.id, 2)  # batch order and augmentation
        inputs = image_inputs(self.backbone, task.train,
                              augment=Augment() if self.augment else None, generator=g)
        targets = torch.from_numpy(task.train.targets)
        opt = torch.optim.Adam([*net.head.parameters(), *net.online.parameters()], lr=self.lr)
        if ema:
            opt.register_step_post_hook(
                lambda *_: ema_update_(net.offline, net.online, self.ema_decay))
        phases = ((frozen_epochs, False), (self.epochs - frozen_epochs, True))
        for epochs, train_pet in phases:
            if not epochs:
                continue
            net.online.requires_grad_(train_pet)
            fit(net, inputs, targets, ctx, epochs=epochs, batch_size=self.batch_size,
                generator=g, optimizer=opt, desc=f"lae task {task.id}",
                loss_fn=lambda z, y: task_cross_entropy(z, y, task.classes))
        net.online.requires_grad_(True)

    # -- prediction and state ---------------------------------------------------------------
    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        return predict_batches(_Ensemble(self.net_), image_inputs(self.backbone, split),
                               len(split), ctx)

    def _state(self) -> dict[str, torch.Tensor]:
        return without_trunk(self.net_)

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.net_ = self._build()
        self.net_.head.expand(state["head.weight"].shape[0])
        load_without_trunk(self.net_, state)

    def parameter_counts(self) -> dict[str, int]:
        base = count(self.backbone.model)
        if self.net_ is None:
            return {"trainable": 0, "total": base}
        learned = count(self.net_.online) + count(self.net_.head)
        return {"trainable": learned, "total": base + learned + count(self.net_.offline)}


@torch.no_grad()
def _expand_head(head: IncrementalLinear, num_classes: int, generator: torch.Generator,
                 init: str = "official") -> None:
    """Grow the head; new rows N(0, 0.001²) (official ``SimpleHead.weights_init``) or, with
    ``init="pilot"``, U(±√(3/D)) (PILOT's ``SimpleLinear``: kaiming-uniform, 'linear'); biases 0.
    """
    old = head.num_classes
    head.expand(num_classes, generator)
    shape = (num_classes - old, head.weight.shape[1])
    if init == "pilot":
        bound = math.sqrt(3.0 / shape[1])
        w = torch.empty(shape).uniform_(-bound, bound, generator=generator)
    else:
        w = torch.randn(shape, generator=generator) * 0.001
    head.weight[old:] = w.to(head.weight)
    head.bias[old:] = 0.0


class _LAENet(nn.Module):
    """The frozen ViT copy, the online and offline PETs and the head; ``forward`` = online
    logits (training), :meth:`logits` with either PET."""

    def __init__(self, vit: nn.Module, online: nn.Module, offline: nn.Module,
                 head: IncrementalLinear):
        super().__init__()
        self.vit, self.online, self.offline, self.head = vit, online, offline, head

    def train(self, mode: bool = True) -> _LAENet:
        super().train(mode)
        self.vit.eval()  # the frozen trunk never trains (no dropout)
        return self

    def logits(self, x: torch.Tensor, pet: nn.Module) -> torch.Tensor:
        with injected(self.vit, pet):
            feat = self.vit(x)  # (B, D) class token
        return self.head(feat)  # (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x, self.online)  # (B, C)


class _Ensemble(nn.Module):
    """Test-time LAE: log max(softmax(z_online), softmax(z_offline))."""

    def __init__(self, net: _LAENet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_softmax_fusion(self.net.logits(x, self.net.online),
                                  self.net.logits(x, self.net.offline))  # (B, C)
