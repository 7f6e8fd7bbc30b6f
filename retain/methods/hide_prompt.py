"""HiDe-Prompt (Wang et al., "Hierarchical Decomposition of Prompt-Based Continual Learning:
Rethinking Obscured Sub-optimality", NeurIPS 2023; official ``thu-ml/HiDe-Prompt``:
``engines/hide_tii_engine.py``, ``engines/hide_promtp_wtp_and_tap_engine.py``,
``vits/hide_prompt_vision_transformer.py``, ``peft/prompt/hide_prompt.py``,
``configs/{cifar100,imr}_hideprompt_5e.py``, ``training_scripts/train_{cifar100,imr}_vit.sh``).

The ViT is frozen. Class-incremental prediction is decomposed into three learned parts
(:mod:`retain.layers.hide` holds the pieces):

* **TII** (task-identity inference): z = head(LN(x + W₂ GELU(W₁ x))) on the frozen feature x of
  an image, over every class seen; the predicted task is the task of the top class. Per task:
  ``tii_epochs`` of Adam on the task's data, cross-entropy over the task's classes only; then
  multi-centroid statistics of each new class's frozen features (k-means, ``n_centroids``
  clusters, mean and diagonal variance each), and, for t > 0, alignment of the whole TII net on
  draws from the statistics of every seen class (``align_on_samples``).
* **WTP** (within-task prediction): one prefix E-prompt per task in blocks ``e_layers``
  (K' = [P_K; K], V' = [P_V; V]); task t trains E-prompt t (a copy of E-prompt t−1 with
  ``shared_prompt_pool``) and the head, with
      L = CE(z̃, y) + reg · CE(M Mᵀ/τ, I),   M = [old classes' prompted centroids; batch features],
  z̃ keeping the task's logits only, τ = ``temperature``. The prompt in use is
  (1 − m)·P_t + m·mean(P_0..P_{t−1}) (m = ``prompt_momentum``, the mean without gradient), and
  that mixture is what E-prompt t keeps after the task. Adam, the prompt at ``lr`` and the head
  at ``lr × head_lr_scale`` (``--larger_prompt_lr``), timm's step/cosine schedule per epoch.
* **TAP** (task-adaptive prediction): multi-centroid statistics of each new class's *prompted*
  features (E-prompt t, no augmentation); for t > 0 the head is aligned on draws from the
  statistics of every seen class.

Prediction, per sample: cached frozen feature → TII → task k → pass with E-prompt k → head.

Deviations from the official code:
* TII trains on the cached features of the unaugmented training images (official: augmented
  images through the frozen ViT each epoch), so its cost is one frozen pass in all.
* One prompt is added per task (official: a pool of ``size`` = 10, at most 10 tasks); the TII
  and WTP heads grow with the classes (official: sized for all classes, the others masked).
* Prefixes are gathered per sample with K and V kept apart (the official ``reshape`` of
  (layers, 2, B, ...) into (layers, B, 2, ...) mixes them across samples when B > 1).
* k-means is :mod:`retain.layers.kmeans` (seeded k-means++, 10 restarts; official: unseeded
  ``sklearn.cluster.KMeans(n_clusters=10)``); draws come from ``ctx.generator``. ``Augment``:
  resized crop + flip (official CIFAR: also ColorJitter(brightness 63/255)).
* Batches are global: the scripts' 8 DDP processes × batch 24 (24·5 draws per centroid, lr
  scaled by 24/256 only, ``--unscale_lr``) are the presets' batch 192, ca_samples 960,
  tii_ca_samples 192. Under torchrun WTP gathers the ranks' logits and features
  (``fit(shard="outputs")``: the contrast sees the whole batch), TII and the alignments split
  their CE ("loss"), k-means is rank 0's (broadcast); no BatchNorm.
Faithful details: the alignment's weight decay is 0 (the scripts' argparse keeps the first
default of the duplicated ``--weight-decay``/``--weight_decay``; the param group overrides SGD's
5e-4); the alignment takes as many steps per epoch as there are classes in the earlier tasks,
batches of ``samples`` (TAP 5 × batch 24 = 120 per cluster; TII 24); the TII trainer scales
``ca_lr`` by 24/256, the WTP trainer does not.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from torch import nn

from ..context import Context
from ..datasets.base import Split
from ..layers.heads import IncrementalLinear
from ..layers.hide import (
    ClassCentroids,
    HiDeNet,
    PromptedFeatures,
    TaskInferenceNet,
    TaskView,
    align_on_samples,
    contrastive_regulariser,
    epoch_lr,
    grow_head,
)
from ..layers.inject import frozen_copy, load_without_trunk, without_trunk
from ..layers.prefix import attach_prefix
from ..params import Interval
from ..scenarios.base import Task
from ..training import feature_inputs, fit, image_inputs, predict_batches, task_cross_entropy
from ..transforms import Augment
from .base import GROWS, NEW_CLASSES, VIT, Method, Needs, blocks_needed, count, register_method

POS = Interval(0, None, "neither")


@register_method("hide_prompt")
class HiDePrompt(Method):
    paper = "Wang et al., NeurIPS 2023 (arXiv 2310.07234)"
    tags = frozenset({GROWS})
    constraints = {"prompt_length": Interval(1, None), "epochs": Interval(0, None), "lr": POS,
                   "head_lr_scale": Interval(0, None), "decay_epochs": Interval(1, None),
                   "batch_size": Interval(1, None), "clip_grad": POS, "reg": Interval(0, None),
                   "temperature": POS, "prompt_momentum": Interval(0, 1),
                   "tii_hidden": Interval(1, None), "tii_epochs": Interval(0, None),
                   "tii_lr": POS, "n_centroids": Interval(1, None), "ca_epochs": Interval(0, None),
                   "ca_lr": POS, "ca_samples": Interval(1, None), "tii_ca_lr": POS,
                   "tii_ca_samples": Interval(1, None), "ca_weight_decay": Interval(0, None),
                   "cov_eps": Interval(0, None)}

    @classmethod
    def requirements(cls, hp: dict) -> list[Needs]:
        return [Needs(VIT, streams=NEW_CLASSES),
                Needs(VIT, blocks=blocks_needed(hp["e_layers"]),
                      because=f"e_layers={hp['e_layers']}", fix="--set params.e_layers=[0]")]

    def __init__(self, backbone, *, e_layers: tuple[int, ...] = (0, 1, 2, 3, 4),
                 prompt_length: int = 5, epochs: int = 50, lr: float = 0.0028125,
                 head_lr_scale: float = 0.1,
                 schedule: Literal["constant", "step", "cosine"] = "step",
                 decay_epochs: int = 30, batch_size: int = 24, clip_grad: float | None = 1.0,
                 augment: bool = True, reg: float = 0.1, temperature: float = 0.8,
                 prompt_momentum: float = 0.01, shared_prompt_pool: bool = True,
                 tii_hidden: int = 2, tii_epochs: int = 20, tii_lr: float = 4.6875e-5,
                 n_centroids: int = 10, ca_epochs: int = 30, ca_lr: float = 0.005,
                 ca_samples: int = 120, tii_ca_lr: float = 4.6875e-4, tii_ca_samples: int = 24,
                 ca_weight_decay: float = 0.0, cov_eps: float = 1e-4):
        super().__init__(backbone)
        self.e_layers = e_layers  # blocks with the task's prefix E-prompt
        self.prompt_length = prompt_length  # CIFAR 5, ImageNet-R 20
        self.epochs = epochs  # WTP epochs per task: CIFAR 50, ImageNet-R 150
        self.lr = lr  # E-prompt rate: 0.03 · 24/256
        self.head_lr_scale = head_lr_scale  # head rate = lr × this (--larger_prompt_lr)
        self.schedule = schedule  # timm, per epoch: CIFAR "step", ImageNet-R "cosine"
        self.decay_epochs = decay_epochs  # "step": × 0.1 every this many epochs
        self.batch_size = batch_size  # WTP and TII
        self.clip_grad = clip_grad
        self.augment = augment
        self.reg = reg  # weight of the contrastive term: CIFAR 0.1, ImageNet-R 0.5
        self.temperature = temperature
        self.prompt_momentum = prompt_momentum  # m: (1-m) P_t + m mean(old)
        self.shared_prompt_pool = shared_prompt_pool  # E-prompt t starts as E-prompt t−1
        self.tii_hidden = tii_hidden  # TII MLP width = this × D (mlp_structure [2])
        self.tii_epochs = tii_epochs  # Adam epochs of the task-inference net per task
        self.tii_lr = tii_lr  # Adam, constant: 0.0005 · 24/256
        self.n_centroids = n_centroids  # k-means clusters per class (both statistics)
        self.ca_epochs = ca_epochs  # alignment epochs of TII and head (crct_epochs)
        self.ca_lr = ca_lr  # head alignment (TAP) SGD rate
        self.ca_samples = ca_samples  # TAP: draws per cluster per epoch, also the batch
        self.tii_ca_lr = tii_ca_lr  # TII alignment rate: 0.005 · 24/256
        self.tii_ca_samples = tii_ca_samples  # TII alignment: draws per cluster per epoch
        self.ca_weight_decay = ca_weight_decay  # weight decay of the alignment steps
        self.cov_eps = cov_eps  # ε added to every variance when sampling
        self.net_: HiDeNet | None = None
        self.tii_: TaskInferenceNet | None = None
        self.tap_stats_: ClassCentroids | None = None  # prompted features (WTP/TAP)
        self.tii_stats_: ClassCentroids | None = None  # frozen features (TII)
        self.task_of_class_ = torch.zeros(0, dtype=torch.int64)  # (C,) task of each label

    def _build(self, generator: torch.Generator | None = None) -> None:
        vit = frozen_copy(self.backbone.model)
        attach_prefix(vit, sorted(self.e_layers), length=0)  # prefixes are given per call
        dim = self.backbone.feature_dim
        self.net_ = HiDeNet(vit, IncrementalLinear(dim), tuple(self.e_layers))
        self.tii_ = TaskInferenceNet(dim, self.tii_hidden, generator)
        self.tap_stats_ = ClassCentroids(dim, self.n_centroids, self.cov_eps)
        self.tii_stats_ = ClassCentroids(dim, self.n_centroids, self.cov_eps)

    # -- learning -------------------------------------------------------------------------------
    def _learn(self, task: Task, ctx: Context) -> None:
        if not task.new_classes:
            raise ValueError(f"{self.name} infers the task from its classes: task {task.id} "
                             "brings no new class (class-incremental streams only)")
        if self.net_ is None:
            self._build(ctx.generator(0, 0))
        self._grow(task, ctx.generator(task.id, 1))
        self._train_prompt(task, ctx)
        self._settle_prompt(task.id)
        tap = self._prompted_features(task.train, task.id, ctx)  # (N, D) TAP: with E-prompt t
        self._remember_and_align(self.net_.head, self.tap_stats_, tap, task, ctx, 3,
                                 lr=self.ca_lr, samples=self.ca_samples, desc="TAP")
        self._learn_tii(task, ctx)

    def _grow(self, task: Task, g: torch.Generator) -> None:
        """E-prompt t (a copy of t−1, or U(−1, 1)); both heads grow to the seen classes."""
        net, dim = self.net_, self.backbone.feature_dim
        if task.id > 0 and self.shared_prompt_pool:
            new = net.prompts[-1].detach().clone()
        else:
            shape = (len(self.e_layers), 2, self.prompt_length, dim)  # (K, 2, L, D)
            new = torch.empty(shape).uniform_(-1.0, 1.0, generator=g)
        net.prompts.append(nn.Parameter(new))
        grow_head(net.head, task.num_seen, g)
        grow_head(self.tii_.head, task.num_seen, g)
        owner = torch.full((task.num_seen,), -1, dtype=torch.int64)
        owner[: len(self.task_of_class_)] = self.task_of_class_
        owner[list(task.new_classes)] = task.id
        self.task_of_class_ = owner

    def _train_prompt(self, task: Task, ctx: Context) -> None:
        """WTP: E-prompt t and the head, masked CE + reg · contrast to the old centroids."""
        if not self.epochs:
            return
        net, g = self.net_, ctx.generator(task.id, 2)
        inputs = image_inputs(self.backbone, task.train,
                              augment=Augment() if self.augment else None, generator=g)

        anchors = self.tap_stats_.centroids()  # (M, D) earlier classes' prompted centroids

        def loss(out, y):
            logits, feats = out
            return (task_cross_entropy(logits, y, task.classes)
                    + self.reg * contrastive_regulariser(feats, anchors, self.temperature))

        bases = [self.lr, self.lr * self.head_lr_scale]
        opt = torch.optim.Adam([{"params": [net.prompts[task.id]], "lr": bases[0]},
                                {"params": list(net.head.parameters()), "lr": bases[1]}])
        view = TaskView(net, task.id, self.prompt_momentum)
        targets = torch.from_numpy(task.train.targets)
        for epoch in range(self.epochs):
            for group, base in zip(opt.param_groups, bases, strict=True):
                group["lr"] = epoch_lr(base, epoch, self.epochs, self.schedule,
                                       decay_epochs=self.decay_epochs)
            fit(view, inputs, targets, ctx, epochs=1, batch_size=self.batch_size, generator=g,
                loss_fn=loss, clip_grad=self.clip_grad, optimizer=opt, shard="outputs",
                desc=f"hide_prompt task {task.id} epoch {epoch}")

    def _settle_prompt(self, t: int) -> None:
        """E-prompt t keeps the momentum mixture it was trained as, and is frozen."""
        prompt = self.net_.prompts[t]
        with torch.no_grad():
            prompt.copy_(self.net_.mixed(t, self.prompt_momentum))
        prompt.requires_grad_(False)

    def _learn_tii(self, task: Task, ctx: Context) -> None:
        feats = ctx.features(self.backbone, task.train)  # (N, D) cached frozen features
        if self.tii_epochs:
            fit(self.tii_, feature_inputs(feats), torch.from_numpy(task.train.targets), ctx,
                epochs=self.tii_epochs, batch_size=self.batch_size,
                generator=ctx.generator(task.id, 5), clip_grad=self.clip_grad,
                loss_fn=partial(task_cross_entropy, classes=task.classes),
                optimizer=torch.optim.Adam(self.tii_.parameters(), lr=self.tii_lr),
                desc=f"hide_prompt TII {task.id}")
        self._remember_and_align(self.tii_, self.tii_stats_, feats, task, ctx, 6,
                                 lr=self.tii_ca_lr, samples=self.tii_ca_samples, desc="TII")

    def _remember_and_align(self, model: nn.Module, stats: ClassCentroids, feats: torch.Tensor,
                            task: Task, ctx: Context, salt: int, *, lr: float, samples: int,
                            desc: str) -> None:
        """The new classes' statistics of ``feats`` (N, D); for t > 0, ``model`` aligned on
        draws of every seen class, one step per epoch per class of the earlier tasks."""
        stats.add(feats, torch.from_numpy(task.train.targets), task.new_classes,
                  ctx.generator(task.id, salt))
        stats.load(ctx.dist.broadcast_object(stats.state("")), "")  # rank 0's k-means
        if task.id > 0 and self.ca_epochs:
            steps = task.num_seen - len(task.new_classes)  # classes of the earlier tasks
            align_on_samples(model, stats, task.seen_classes, steps, epochs=self.ca_epochs,
                             lr=lr, samples=samples, weight_decay=self.ca_weight_decay,
                             ctx=ctx, generator=ctx.generator(task.id, salt + 1),
                             desc=f"hide_prompt {desc}")

    def _prompted_features(self, split: Split, t: int, ctx: Context) -> torch.Tensor:
        """(N, D) features of ``split`` with E-prompt t, no augmentation."""
        return predict_batches(PromptedFeatures(self.net_, t), image_inputs(self.backbone, split),
                               len(split), ctx)

    # -- prediction -----------------------------------------------------------------------------
    def infer_tasks(self, split: Split, ctx: Context) -> torch.Tensor:
        """(N,) task of each sample: the task of its top TII class on its cached feature."""
        q = ctx.features(self.backbone, split)  # (N, D) frozen, from the cache
        logits = predict_batches(self.tii_, feature_inputs(q), len(split), ctx)  # (N, C)
        return self.task_of_class_[logits.argmax(1)]

    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        tasks = self.infer_tasks(split, ctx)  # (N,)

        def inputs(pos):
            return self.backbone.preprocess(split, pos), tasks[torch.from_numpy(pos)]

        return predict_batches(self.net_, inputs, len(split), ctx)  # (N, C)

    # -- state ----------------------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        net = without_trunk(self.net_)
        tii = {f"tii.{k}": v for k, v in self.tii_.state_dict().items()}
        return (net | tii | self.tap_stats_.state("tap_stats.")
                | self.tii_stats_.state("tii_stats.") | {"task_of_class": self.task_of_class_})

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self._build()
        tasks = sum(k.startswith("prompts.") for k in state)
        for i in range(tasks):
            self.net_.prompts.append(nn.Parameter(state[f"prompts.{i}"], requires_grad=False))
        self.net_.head.expand(state["head.weight"].shape[0])
        self.tii_.head.expand(state["tii.head.weight"].shape[0])
        own = ("tii.", "tap_stats.", "tii_stats.", "task_of_class")
        load_without_trunk(self.net_, {k: v for k, v in state.items() if not k.startswith(own)})
        self.tii_.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("tii.")})
        self.tap_stats_.load(state, "tap_stats.")
        self.tii_stats_.load(state, "tii_stats.")
        self.task_of_class_ = state["task_of_class"].long()

    def parameter_counts(self) -> dict[str, int]:
        """Trainable: the E-prompts of the tasks learned, the head, the TII net."""
        base = count(self.backbone.model)
        if self.net_ is None:
            return {"trainable": 0, "total": base}
        learned = sum(p.numel() for p in self.net_.prompts) + count(self.net_.head)
        learned += count(self.tii_)
        return {"trainable": learned, "total": base + learned}

