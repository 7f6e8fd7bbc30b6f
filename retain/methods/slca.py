"""SLCA (Zhang et al., "SLCA: Slow Learner with Classifier Alignment for Continual Learning on a
Pre-trained Model", ICCV 2023; official ``GengDavid/SLCA`` ``models/slca.py``; LAMDA-PILOT
``models/slca.py``, the same code).

Stage 1 (every task): the whole backbone is fine-tuned as a *slow learner* (its learning rate is
the head's times ``backbone_lr_scale`` = 0.01) together with a new linear head for the task's
classes (trunc-normal std 0.02, bias 0); the loss is cross-entropy over the new head's logits only
(targets shifted), old heads take no part. SGD (momentum 0.9, weight decay 5e-4), learning rates
×``lr_decay`` after epoch ``milestone``. Then the mean and full covariance of each new class's
training features are taken once, with the fine-tuned network and no augmentation
(``retain.layers.gaussian``); old-class statistics are never recomputed.

Stage 2, classifier alignment (tasks t > 0): for ``ca_epochs`` epochs, draw ``ca_samples``
vectors per seen class c from N(s_c·μ_c, Σ_c), s_c = 0.9 + 0.1·(task(c)+1)/(t+1), shuffle them
and train every head on them in batches of ``ca_samples`` with the normalised logits
z' = z / mean_k ‖z_k‖₂ / τ (z_k: the logits of head k, τ = ``logit_norm``); SGD at ``lr``, cosine
over the epochs. Prediction: one pass of the fine-tuned network, concatenated head logits.

Where we differ from the official code:
* The aligned heads are **kept** for the next task. The official code evaluates with them and
  then restores the stage-1 heads (``fc.recall()`` in ``after_task``), so every alignment starts
  again from unaligned heads; ``restore_heads=True`` reproduces that.
* task(c) is the task that brought class c; the official ``c // task_size`` uses the current
  task's size, which is wrong when tasks differ in size (B50Inc10, a short last task).
* Draws come from ``ctx.generator`` in float64 (official: ``MultivariateNormal`` in float32 on a
  covariance stored in float32), so runs are reproducible and resumable.
* Augmentation is ``retain.transforms.Augment`` (PILOT's RandomResizedCrop scale (0.05, 1) +
  flip; official: torchvision's default scale (0.08, 1), plus ColorJitter on CIFAR).
* The pre-trained final LayerNorm is kept, as PILOT. The official ``convs/vits.py`` deletes it
  and puts a fresh ``nn.LayerNorm(768)`` (γ = 1, β = 0, eps 1e-5) in its place before training,
  which the slow learner then trains with the rest; ``fresh_norm=True`` does that.
The fine-tuned network is a new ``Backbone`` after each task (identity: sha256 of its weights),
so the feature cache embeds each test image once per network version.
"""

from __future__ import annotations

import copy
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..adaptation import adapted_backbone
from ..backbones import Backbone
from ..context import Context
from ..datasets.base import Split
from ..errors import ConfigError
from ..layers.gaussian import ClassGaussians
from ..params import Interval
from ..scenarios.base import Task
from ..training import feature_inputs, fit, image_inputs, load_prefixed, predict_batches, seeded
from ..transforms import Augment
from .base import GROWS, NEW_CLASSES, Method, Needs, count, register_method


class TaskHeads(nn.Module):
    """One linear head per task on a shared feature; logits concatenated in class order."""

    def __init__(self, dim: int, sizes: list[int] | tuple[int, ...] = ()):
        super().__init__()
        self.dim = dim
        self.heads = nn.ModuleList(nn.Linear(dim, k) for k in sizes)

    @property
    def sizes(self) -> list[int]:
        return [h.out_features for h in self.heads]

    def add(self, k: int, generator: torch.Generator) -> nn.Linear:
        """A new head for ``k`` classes: weight trunc-normal (std 0.02), bias 0."""
        head = nn.Linear(self.dim, k, device="meta").to_empty(device=self._device())
        nn.init.trunc_normal_(head.weight, std=0.02, generator=generator)
        nn.init.zeros_(head.bias)
        self.heads.append(head)
        return head

    def _device(self) -> torch.device:
        return self.heads[0].weight.device if len(self.heads) else torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(x) for h in self.heads], dim=1)  # (B, C)


def normalise_logits(z: torch.Tensor, sizes: list[int], tau: float) -> torch.Tensor:
    """z / (mean over task heads of ‖z_task‖₂) / τ (SLCA's logit normalisation)."""
    norms = torch.stack([p.norm(dim=1) + 1e-7 for p in z.split(sizes, dim=1)], 1)  # (B, T)
    return z / norms.mean(1, keepdim=True) / tau  # (B, C)


def mean_scales(task_of_class: torch.Tensor, t: int) -> torch.Tensor:
    """s_c = 0.9 + 0.1·(task(c)+1)/(t+1): older classes' means are shrunk more."""
    return 0.9 + 0.1 * (task_of_class.double() + 1) / (t + 1)  # (C,)


def alignment_loss(z: torch.Tensor, y: torch.Tensor, sizes: list[int], tau: float
                   ) -> torch.Tensor:
    return F.cross_entropy(normalise_logits(z, sizes, tau) if tau > 0 else z, y)


@register_method("slca")
class SLCA(Method):
    paper = "Zhang et al., ICCV 2023 (arXiv 2303.05118)"
    tags = frozenset({GROWS})
    needs = Needs(streams=NEW_CLASSES)  # a head per task
    constraints = {"epochs": Interval(1, None), "lr": Interval(0, None, "neither"),
                   "backbone_lr_scale": Interval(0, None), "milestone": Interval(1, None),
                   "lr_decay": Interval(0, None, "neither"), "batch_size": Interval(1, None),
                   "weight_decay": Interval(0, None), "momentum": Interval(0, 1, "left"),
                   "ca_epochs": Interval(0, None), "ca_samples": Interval(1, None),
                   "logit_norm": Interval(0, None), "cov_eps": Interval(0, None)}

    def __init__(self, backbone, *, epochs: int = 20, lr: float = 0.01,
                 backbone_lr_scale: float = 0.01, milestone: int = 18, lr_decay: float = 0.1,
                 batch_size: int = 128, weight_decay: float = 5e-4, momentum: float = 0.9,
                 augment: bool = True, ca_epochs: int = 5, ca_samples: int = 256,
                 logit_norm: float = 0.1, cov_eps: float = 1e-4, restore_heads: bool = False,
                 fresh_norm: bool = False):
        super().__init__(backbone)
        self.epochs = epochs
        self.lr = lr  # head learning rate, and the alignment's
        self.backbone_lr_scale = backbone_lr_scale  # slow learner: backbone lr = lr × this
        self.milestone = milestone  # epoch after which learning rates are × lr_decay
        self.lr_decay = lr_decay
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.augment = augment
        self.ca_epochs = ca_epochs  # classifier-alignment epochs (0: no alignment)
        self.ca_samples = ca_samples  # draws per class per epoch, also the alignment batch
        self.logit_norm = logit_norm  # τ of the logit normalisation (0: plain logits)
        self.cov_eps = cov_eps  # ε·I added to every class covariance
        self.restore_heads = restore_heads  # official: next task starts from stage-1 heads
        self.fresh_norm = fresh_norm  # official: the final norm re-initialised (γ=1, β=0)
        self.body_: Backbone | None = None  # the fine-tuned network, frozen between tasks
        self.heads_: TaskHeads | None = None  # the heads used for prediction
        self.stage1_: TaskHeads | None = None  # restore_heads: the heads before alignment
        self.stats_: ClassGaussians | None = None
        self.task_of_class_ = torch.zeros(0, dtype=torch.int64)  # (C,)

    # -- learning -------------------------------------------------------------------------------
    def _learn(self, task: Task, ctx: Context) -> None:
        self._check(task)
        if self.heads_ is None:
            self.heads_ = TaskHeads(self.backbone.feature_dim)
            self.stats_ = ClassGaussians(self.backbone.feature_dim, self.cov_eps)
        if self.restore_heads and self.stage1_ is not None:
            self.heads_ = copy.deepcopy(self.stage1_)
        net = self._network() if self.body_ is None else self.body_.model
        self.body_ = None  # trained in place below: its features are no longer valid
        head = self.heads_.add(len(task.new_classes), ctx.generator(task.id, 0))
        self._slow_learn(net, head, task, ctx)
        self.body_ = adapted_backbone(self.backbone, net, "slca")
        new = torch.full((len(task.new_classes),), task.id, dtype=torch.int64)
        self.task_of_class_ = torch.cat([self.task_of_class_, new])
        targets = torch.from_numpy(task.train.targets)
        self.stats_.add(ctx.features(self.body_, task.train), targets, task.new_classes)
        if self.restore_heads:
            self.stage1_ = copy.deepcopy(self.heads_)
        if task.id > 0 and self.ca_epochs > 0:
            self._align(task, ctx)

    def _network(self) -> nn.Module:
        """A copy of the backbone, its final norm fresh if ``fresh_norm`` (``convs/vits.py``)."""
        net = copy.deepcopy(self.backbone.model)
        if self.fresh_norm:
            if not isinstance(getattr(net, "norm", None), nn.LayerNorm):
                raise ConfigError("slca fresh_norm=true needs a ViT whose final norm is a "
                                  "LayerNorm (model.norm); use fresh_norm=false")
            net.norm = nn.LayerNorm(net.norm.normalized_shape)  # γ = 1, β = 0, eps 1e-5
        return net

    def _check(self, task: Task) -> None:
        known = len(self.task_of_class_)
        if not task.new_classes or task.new_classes != tuple(range(known, task.num_seen)):
            raise ValueError(f"{self.name} adds a head per task: task {task.id} must bring new "
                             f"classes labelled {known}.. (class- or task-incremental streams)")

    def _slow_learn(self, net: nn.Module, head: nn.Linear, task: Task, ctx: Context) -> None:
        """Stage 1: CE on the new head's logits; backbone at lr × backbone_lr_scale."""
        g = ctx.generator(task.id, 1)
        model = nn.Sequential(net, head).to(ctx.device)
        net.requires_grad_(self.backbone_lr_scale > 0)
        opt = self._optimizer(net, head)  # rates × lr_decay after epoch `milestone`, as official
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [self.milestone], self.lr_decay)
        targets = torch.from_numpy(task.train.targets) - min(task.new_classes)
        with seeded(g, ctx.device):  # dropout / drop-path of the network, if it has any
            fit(model, self._train_inputs(task.train, g), targets, ctx, epochs=self.epochs,
                batch_size=self.batch_size, generator=g, optimizer=opt, scheduler=sched,
                schedule_unit="epoch", desc=f"slca task {task.id}")

    def _optimizer(self, net: nn.Module, head: nn.Module) -> torch.optim.SGD:
        """Parameter groups: the head at ``lr``, the backbone at ``lr × backbone_lr_scale``."""
        groups = [{"params": list(head.parameters()), "lr": self.lr}]
        if self.backbone_lr_scale > 0:
            groups.insert(0, {"params": list(net.parameters()),
                              "lr": self.lr * self.backbone_lr_scale})
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)

    def _train_inputs(self, split: Split, generator: torch.Generator):
        return image_inputs(self.backbone, split, augment=Augment() if self.augment else None,
                            generator=generator)  # (B, 3, S, S)

    def _align(self, task: Task, ctx: Context) -> None:
        """Stage 2: every head trained on draws from the seen classes' Gaussians."""
        g = ctx.generator(task.id, 2)
        heads = self.heads_.to(ctx.device).requires_grad_(True)
        opt = torch.optim.SGD(heads.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        scales = mean_scales(self.task_of_class_, task.id)  # (C,), classes 0..C-1 in order
        draw = self.stats_.sampler(task.seen_classes, scales)
        loss = partial(alignment_loss, sizes=heads.sizes, tau=self.logit_norm)
        for epoch in range(self.ca_epochs):
            for group in opt.param_groups:  # cosine over epochs, as the official scheduler
                group["lr"] = self.lr * (1 + math.cos(math.pi * epoch / self.ca_epochs)) / 2
            x, y = draw(self.ca_samples, g)  # (C·n, D), (C·n,)
            fit(heads, feature_inputs(x), y, ctx, epochs=1, batch_size=self.ca_samples,
                generator=g, optimizer=opt, loss_fn=loss, desc=f"slca align {task.id}")
        heads.requires_grad_(False)

    # -- prediction -----------------------------------------------------------------------------
    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        feats = ctx.features(self.body_, split)  # (N, D), one pass per network version
        return predict_batches(self.heads_, feature_inputs(feats), len(split), ctx)  # (N, C)

    # -- state ----------------------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        state = {f"net.{k}": v for k, v in self.body_.model.state_dict().items()}
        state |= {f"head.{k}": v for k, v in self.heads_.state_dict().items()}
        if self.stage1_ is not None:
            state |= {f"stage1.{k}": v for k, v in self.stage1_.state_dict().items()}
        return state | self.stats_.state("stats.") | {"task_of_class": self.task_of_class_}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        net = self._network()
        load_prefixed(net, state, "net.")
        self.body_ = adapted_backbone(self.backbone, net, "slca")
        self.task_of_class_ = state["task_of_class"].long()
        self.heads_ = self._load_heads(state, "head.")
        restored = "stage1.heads.0.weight" in state
        self.stage1_ = self._load_heads(state, "stage1.") if restored else None
        self.stats_ = ClassGaussians(self.backbone.feature_dim, self.cov_eps)
        self.stats_.load(state, "stats.")

    def _load_heads(self, state: dict[str, torch.Tensor], prefix: str) -> TaskHeads:
        heads = TaskHeads(self.backbone.feature_dim, torch.bincount(self.task_of_class_).tolist())
        load_prefixed(heads, state, prefix)
        return heads.requires_grad_(False)

    def parameter_counts(self) -> dict[str, int]:
        body = count(self.backbone.model)
        heads = 0 if self.heads_ is None else count(self.heads_)
        trainable = heads + (body if self.backbone_lr_scale > 0 else 0)
        return {"trainable": trainable, "total": body + heads}
