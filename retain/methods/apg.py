"""APG (Tang et al., "When Prompt-based Incremental Learning Does Not Meet Strong Pretraining",
ICCV 2023; official code TOM-tym/APG, config
``options/continual_trans/pretrained/CIFAR100_pretrained_vitbase_T10.yaml``).

A frozen ViT runs blocks 0..L (L = ``immediate_layer``); its class token x_L enters the Adaptive
Prompt Generator (``retain.layers.apg``: MLP → cross-attention against one learnable extra
token per seen class → MLP), whose prompt p(x_L) is put right after the class token before
block L+1; blocks L+1.. and the final norm follow and the class token is the feature f, scored by
a proxy head (K = 10 proxies per class). The trunk runs once per image (a pre-hook on block L+1,
``Self_Prompts.forward_features_shotcut``). Per task t (``inclearn/models/continual_trans.py``,
``inclearn/lib/deit_engine.py``):

1. Grow the head, freeze the extra tokens of past tasks, add one token per new class.
2. Train generator + head (AdamW, warm-up + cosine per epoch) on
   L = CE(z, y) + [CE(s/τ, y) + KL-triplet(s, y)] + 0.01·relu(‖p‖₁ − 100·‖x‖₁)
       + L1(G(c̃), p̄_c) + CE(head(f̃), c)
   (z over all seen classes; s the generator's raw attention logits over the extra tokens;
   ‖x‖₁ the mean L1 norm of the intermediate tokens; the last two terms (t > 0) use the centre
   library: c̃ ~ N(μ_c, Σ_c) of an old class's intermediate class tokens, f̃ ~ N(μ'_c, Σ'_c) of its
   prompted features, p̄_c the mean prompt of its training images).
3. Centre library: Gaussians (full covariance + ε·I) of x_L and f, and p̄, for the new classes
   (training images, test transform; ``build_center_library``); ε = 1e-5 on CIFAR-100/ImageNet-R
   (the default), else 1e-6 on every entry (``cov_eps: 1e-6, cov_reg: all_entries``; that needs
   more images per class than dimensions) as ``build_center_lib_loader``.
4. t ≥ 1 (``finetune_task: [1..10]``): finetune generator + head for 20 + 5·t epochs on library
   draws of every seen class: L = L1(G(c̃), p̄_c) + CE(head(f̃), c), generator in eval mode; then the
   new classes' statistics are recomputed (old classes' never are).

Under torchrun each global batch (augmentation and library draws as one process) is split over
the ranks (shard "loss": every term is a per-sample mean or a whole library batch weighted by the
share), the generator's dropout drawing the global batch's masks (``retain.layers.rows``); the
finetuning splits its library draws the same way; statistics come from gathered passes.
Prediction is per sample; no task id. Followed: the files above, ``trans_classifiers.py``,
``losses/base.py``, ``data/TensorAugDataset.py``, ``train.py``. Simplified / deviations:
* Training images get retain's crop + flip (``Augment``) only; the reference's DeiT pipeline
  (RandAugment, random erasing, mixup 0.8 / cutmix 1.0 with label smoothing 0.1) is left out.
* The reference multiplies lr/warmup_lr/min_lr by batch·GPUs/1024 from task 1 on
  (``utils.lr_scaler``); we use the yaml rates in every task. Its timm scheduler lags one epoch.
* Library batches are class-balanced (``center_samples`` draws spread over all library classes)
  rather than 128 random classes × 4 draws; a finetune epoch has as many steps as the reference
  (``images per class × classes / 128``).
* One prompt per image and one token per class (``more_prompts``/``class_n_prompts`` = 1, the
  yaml's values); the triplet term on prompts has weight 0 in the yaml and is omitted; no deep
  block is trained (``frozen_layer: 11``). Task 0 is evaluated with the generator (the reference
  reports task 0 without it). Prompts are put after every prefix token (class and registers).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..context import Context
from ..datasets.base import Split
from ..layers.apg import (
    APGNet,
    CenterLibrary,
    Described,
    PromptGenerator,
    ProxyLinear,
    attention_loss,
)
from ..layers.inject import frozen_copy, load_without_trunk, without_trunk
from ..layers.rows import RowKeyed, row_ids
from ..layers.schedules import warmup_cosine
from ..params import Interval
from ..scenarios.base import Task
from ..training import backward_share, fit, image_inputs, predict_batches, seeded
from ..transforms import Augment
from .base import GROWS, VIT, Method, Needs, count, register_method

_POS = Interval(0, None, "neither")


@register_method("apg")
class APG(Method):
    paper = "Tang et al., ICCV 2023 (arXiv 2308.10445)"
    tags = frozenset({GROWS})
    constraints = {"immediate_layer": Interval(0, None), "generator_heads": Interval(1, None),
                   "proxies_per_class": Interval(1, None), "epochs": Interval(0, None),
                   "lr": _POS, "warmup_epochs": Interval(0, None), "warmup_lr": _POS,
                   "min_lr": Interval(0, None), "weight_decay": Interval(0, None),
                   "batch_size": Interval(1, None), "attn_coeff": Interval(0, None),
                   "norm_coeff": Interval(0, None), "norm_scale": Interval(0, None),
                   "constraint_coeff": Interval(0, None), "memory_ce_coeff": Interval(0, None),
                   "center_samples": Interval(1, None), "finetune_epochs": Interval(0, None),
                   "finetune_epochs_per_task": Interval(0, None), "finetune_lr": _POS,
                   "finetune_warmup_lr": _POS, "finetune_min_lr": Interval(0, None),
                   "cov_eps": _POS}

    @classmethod
    def requirements(cls, hp: dict) -> list[Needs]:  # the prompt enters before block L + 1
        layer = hp["immediate_layer"]
        return [Needs(VIT), Needs(VIT, blocks=layer + 2, because=f"immediate_layer={layer}",
                                  fix="--set params.immediate_layer=0")]

    def __init__(self, backbone, *, immediate_layer: int = 5, generator_heads: int = 4,
                 generator_residual: bool = False, proxies_per_class: int = 10,
                 epochs: int = 100, lr: float = 1e-3, warmup_epochs: int = 5,
                 warmup_lr: float = 1e-4, min_lr: float = 5e-4, weight_decay: float = 0.05,
                 batch_size: int = 96, attn_coeff: float = 1.0, norm_coeff: float = 0.01,
                 norm_scale: float = 100.0, constraint_coeff: float = 1.0,
                 memory_ce_coeff: float = 1.0, center_samples: int = 512,
                 finetune_epochs: int = 20, finetune_epochs_per_task: int = 5,
                 finetune_lr: float = 1e-3, finetune_warmup_lr: float = 1e-5,
                 finetune_min_lr: float = 1e-4, cov_eps: float = 1e-5,
                 cov_reg: Literal["identity", "all_entries"] = "identity", augment: bool = True):
        super().__init__(backbone)
        self.immediate_layer = immediate_layer  # the generator reads the class token after it
        self.generator_heads = generator_heads  # attention heads of the prompt generator
        self.generator_residual = generator_residual  # yaml APG_residual: False
        self.proxies_per_class = proxies_per_class  # fc_proxy_per_class
        self.epochs = epochs
        self.lr = lr  # generator and head (lr, lr_cls)
        self.warmup_epochs = warmup_epochs  # both stages
        self.warmup_lr = warmup_lr
        self.min_lr = min_lr
        self.weight_decay = weight_decay  # AdamW, both stages (APG_wd = weight_decay = 0.05)
        self.batch_size = batch_size
        self.attn_coeff = attn_coeff  # KLDivTripletWithHardCe (p_attn: True)
        self.norm_coeff = norm_coeff  # loss_norm
        self.norm_scale = norm_scale  # loss_norm_scale
        self.constraint_coeff = constraint_coeff  # centre constraint, L1
        self.memory_ce_coeff = memory_ce_coeff  # cross_entropy_mem
        self.center_samples = center_samples  # library draws per step (128 × center_lib_n 4)
        self.finetune_epochs = finetune_epochs  # head fine-tuning epochs (tasks 2, 3, ...)
        self.finetune_epochs_per_task = finetune_epochs_per_task  # scale_finetune_epochs
        self.finetune_lr = finetune_lr  # fine-tuning learning rate
        self.finetune_warmup_lr = finetune_warmup_lr  # fine-tuning rate at the start of its warm-up
        self.finetune_min_lr = finetune_min_lr  # floor of the fine-tuning schedule
        self.cov_eps = cov_eps
        self.cov_reg = cov_reg  # identity: Σ + ε·I (cifar100, imagenetr); all_entries: Σ + ε·11ᵀ
        self.augment = augment
        self.net_: APGNet | None = None
        self.library_: CenterLibrary | None = None

    # -- learning ---------------------------------------------------------------------------
    def _build(self, generator: torch.Generator | None = None) -> APGNet:
        vit, dim = self.backbone.model, self.backbone.feature_dim
        if not hasattr(vit, "blocks") or self.immediate_layer >= len(vit.blocks) - 1:
            depth = len(getattr(vit, "blocks", ()))
            raise ValueError(f"apg: immediate_layer={self.immediate_layer} must be below the "
                             f"last block of a ViT of depth {depth} (at most {depth - 2})")
        gen = PromptGenerator(dim, self.generator_heads, self.generator_residual,
                              generator=generator)
        return APGNet(frozen_copy(vit), gen, ProxyLinear(dim, self.proxies_per_class),
                       self.immediate_layer)

    def _learn(self, task: Task, ctx: Context) -> None:
        if self.net_ is None:
            self.net_ = self._build(ctx.generator(0, 0))
            self.library_ = CenterLibrary(self.backbone.feature_dim, self.cov_eps, self.cov_reg)
        net = self.net_
        net.head.expand(task.num_seen, ctx.generator(task.id, 1))
        net.generator.tokens.freeze()  # frozen_old_prompt
        net.generator.tokens.grow(task.num_seen - len(net.generator.tokens),
                                  ctx.generator(task.id, 2))
        net.to(ctx.device)
        with seeded(ctx.generator(task.id, 5), ctx.device):  # the generator's dropout
            self._train(task, ctx)
        if not task.new_classes:  # nothing new to describe (a stream that revisits classes)
            return
        old = self.library_
        self.library_ = old.extended(*self._statistics(task.train, ctx), task.new_classes)
        if task.id >= 1 and self.finetune_epochs + self.finetune_epochs_per_task > 0:
            self._finetune(task, ctx)  # then the new classes' statistics are taken again
            self.library_ = old.extended(*self._statistics(task.train, ctx), task.new_classes)

    def _train(self, task: Task, ctx: Context) -> None:
        if not self.epochs:
            return
        g = ctx.generator(task.id, 3)  # batch order, augmentation, library draws
        split = task.train
        inputs = image_inputs(self.backbone, split,
                              augment=Augment() if self.augment else None, generator=g)
        draw = self.library_.sampler(ctx.device) if len(self.library_) else None
        per_class = math.ceil(self.center_samples / max(1, len(self.library_)))

        def loss(out, y):
            logits, _, attn, prompts, token_norm = out
            total = F.cross_entropy(logits, y) + self.attn_coeff * attention_loss(attn, y)
            p_norm = prompts.abs().sum(-1).mean()
            total = total + self.norm_coeff * F.relu(p_norm - self.norm_scale * token_norm)
            if draw is not None:
                total = total + self._library_loss(*draw(per_class, g), eval_gen=False)
            return total

        opt, steps = self._optimizer(self.lr), math.ceil(len(split) / self.batch_size)
        sched = warmup_cosine(opt, self.epochs, steps, warmup_epochs=self.warmup_epochs,
                              warmup_lr=self.warmup_lr, min_lr=self.min_lr)
        fit(RowKeyed(self.net_), lambda pos: (inputs(pos), row_ids(len(pos))),
            torch.from_numpy(split.targets), ctx, epochs=self.epochs,
            batch_size=self.batch_size, generator=g, loss_fn=loss, optimizer=opt,
            scheduler=sched, schedule_unit="step", desc=f"apg task {task.id}")

    def _library_out(self, centroids, feats, prompts, *, eval_gen: bool):
        """G(c̃) (n, D), p̄_c (n, D) and head(f̃) (n, C·K) of library draws."""
        gen = self.net_.generator
        gen.train(not eval_gen)
        generated, _ = gen(centroids)  # (n, 1, D)
        return generated[:, 0], prompts, self.net_.head(feats)

    def _library_terms(self, out, labels) -> torch.Tensor:
        """L1(G(c̃), p̄_c)·constraint + CE(head(f̃), c)·memory CE."""
        generated, prompts, logits = out
        return self.constraint_coeff * F.l1_loss(generated, prompts) \
            + self.memory_ce_coeff * F.cross_entropy(logits, labels)

    def _library_loss(self, centroids, feats, prompts, labels, *, eval_gen: bool) -> torch.Tensor:
        return self._library_terms(self._library_out(centroids, feats, prompts,
                                                     eval_gen=eval_gen), labels)

    def _finetune(self, task: Task, ctx: Context) -> None:
        """Generator + head on library draws of every seen class (``fine_tune_adaptive_prompt_
        generator``); 20 + 5·t epochs of images-per-class × classes / 128 steps."""
        epochs = self.finetune_epochs + self.finetune_epochs_per_task * task.id
        per_class = len(task.train) / max(1, len(task.new_classes))
        steps = math.ceil(per_class * len(self.library_) / (self.center_samples / 4))
        opt = self._optimizer(self.finetune_lr)
        sched = warmup_cosine(opt, epochs, steps, warmup_epochs=self.warmup_epochs,
                              warmup_lr=self.finetune_warmup_lr, min_lr=self.finetune_min_lr)
        draw, g = self.library_.sampler(ctx.device), ctx.generator(task.id, 4)
        n = math.ceil(self.center_samples / len(self.library_))
        params, forward = self._optimized(opt), partial(self._library_out, eval_gen=True)
        self.net_.train()
        for _ in range(epochs * steps):
            centroids, feats, prompts, labels = draw(n, g)  # every rank draws the same
            opt.zero_grad(set_to_none=True)
            backward_share(forward, self._library_terms, (centroids, feats, prompts), labels, ctx,
                           params)  # per-draw means: each rank its share of the draws
            opt.step()
            sched.step()
        ctx.dist.same_state(self.net_, g)
        self.net_.eval()

    @staticmethod
    def _optimized(opt: torch.optim.Optimizer) -> list[nn.Parameter]:
        return [p for group in opt.param_groups for p in group["params"]]

    def _optimizer(self, lr: float) -> torch.optim.AdamW:
        trainable = [p for p in self.net_.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=self.weight_decay)

    def _statistics(self, split: Split, ctx: Context):
        """Intermediate class tokens, prompts and features (N, D) of ``split`` (test transform),
        and its labels."""
        x = predict_batches(Described(self.net_), image_inputs(self.backbone, split),
                            len(split), ctx)  # (N, 3D)
        return (*x.chunk(3, dim=1), torch.from_numpy(split.targets))

    # -- prediction and state ---------------------------------------------------------------
    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        return predict_batches(self.net_, image_inputs(self.backbone, split), len(split), ctx)

    def _state(self) -> dict[str, torch.Tensor]:
        net = without_trunk(self.net_)
        return {**net, **self.library_.state()}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.net_ = self._build()
        self.net_.head.expand(state["head.weight"].shape[0] // self.proxies_per_class)
        blocks = sorted((k for k in state if k.startswith("generator.tokens.blocks.")),
                        key=lambda k: int(k.rsplit(".", 1)[1]))
        for k in blocks:
            self.net_.generator.tokens.blocks.append(nn.Parameter(state[k]))
        load_without_trunk(self.net_, {k: v for k, v in state.items()
                                       if not k.startswith("lib.")})
        self.library_ = CenterLibrary(self.backbone.feature_dim, self.cov_eps, self.cov_reg)
        self.library_.load(state)

    def parameter_counts(self) -> dict[str, int]:
        base = count(self.backbone.model)
        learned = 0 if self.net_ is None else count(self.net_) - count(self.net_.vit)
        return {"trainable": learned, "total": base + learned}
