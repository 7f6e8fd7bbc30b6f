"""S-Prompts (Wang et al., "S-Prompts Learning with Pre-trained Transformers: An Occam's Razor for
Domain Incremental Learning", NeurIPS 2022; official code iamwangyabin/S-Prompts
``methods/sprompt.py``, ``models/sinet.py``, ``models/slinet.py``,
``models/clip/prompt_learner.py``, ``configs/*.json``).

Every domain s of a domain-incremental stream gets its own image prompt I_s (L tokens, shallow:
inserted after the class token, after the positional embedding and before ``norm_pre``, i.e.
before CLIP's ``ln_pre`` as the official ``VisionTransformer.forward(x, instance_tokens)``; on a
ViT without ``norm_pre`` this is the input of block 0) and its own classifier; the backbone is
frozen. Two variants (``variant``):

* ``"image"`` — S-iPrompts (``models/sinet.py``), any timm ViT: classifier = a linear head W_s on
  the final-layer class token of the pass ``[CLS, I_s, patches]``.
* ``"language_image"`` — S-liPrompts (``models/slinet.py``), the paper's headline method; needs
  a CLIP backbone (``clip_vit_b16``): classifier = a CoOp text prompt per domain (M =
  ``text_context`` context vectors shared by the classes, ``retain.layers.coop``), logits
  exp(logit_scale)·cos(f_img(x; I_s), f_txt(class; ctx_s)) with both CLIP towers frozen. The
  text features of domain s are computed once after its training and stored.

Domain s trains only its prompt and classifier with cross-entropy on its own data. Afterwards the
L2-normalised frozen features f(x) of the domain's training images are clustered into K centroids
c_{s,1..K}. A test image picks the domain

    ŝ(x) = argmin_s min_k Σ_d |f(x)_d − c_{s,k,d}|          (L1, as ``_eval_cnn``)

and is classified by domain ŝ's classifier on the pass prompted with I_ŝ. f(x) is the cached
frozen feature, so a test image costs one prompted pass plus a cached feature; every sample
picks its own domain.

Deviations: K-means is retain's seeded k-means (``retain.layers.kmeans``: k-means++, 10
restarts, as sklearn's KMeans with ``random_state=0`` but not bit-identical) on features of the
un-augmented training images (the reference clusters the augmented training loader). The
cosine learning rate steps once per epoch (``schedule_unit="epoch"``, as the official
``CosineAnnealingLR(T_max=epochs)``); ``"step"`` decays it after every batch instead. Domain s
trains and uses ctx_s, as the official ``SliNet.forward`` at the cited commit
(``classifier_pool[self.numtask-1]``; the ``classifier_pool[-1]`` of earlier versions was fixed
in cdca371). On a class-incremental stream the classifier of domain s covers the classes seen up
to task s; classes it never saw get logit −inf. CORe50 and CDDB (the other benchmarks of the
paper) are not available in retain.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..context import Context
from ..datasets.base import Split
from ..errors import ConfigError
from ..layers.coop import DomainContexts
from ..layers.inject import frozen_copy
from ..layers.kmeans import kmeans
from ..layers.sprompts import DomainTraining, SPromptsNet, nearest_domain
from ..params import Interval
from ..scenarios.base import Task
from ..training import ScheduleUnit, fit, predict_batches, task_cross_entropy
from ..transforms import Augment
from .base import CLIP, FROZEN_BACKBONE, GROWS, VIT_OR_CLIP, Method, Needs, register_method


@register_method("sprompts")
class SPrompts(Method):
    paper = "Wang et al., NeurIPS 2022 (arXiv 2207.12819)"
    tags = frozenset({FROZEN_BACKBONE, GROWS})
    constraints = {"prompt_length": Interval(1, None), "num_centroids": Interval(1, None),
                   "epochs": Interval(0, None), "lr": Interval(0, None, "neither"),
                   "weight_decay": Interval(0, None), "init_epochs": Interval(0, None),
                   "init_lr": Interval(0, None, "neither"),
                   "init_weight_decay": Interval(0, None), "batch_size": Interval(1, None),
                   "text_context": Interval(1, None)}

    @classmethod
    def requirements(cls, hp: dict) -> list[Needs]:
        if hp["variant"] == "language_image":  # S-liPrompts: text contexts per domain
            return [Needs(CLIP, because="variant=language_image", fix="--set params.variant=image")]
        return [Needs(VIT_OR_CLIP)]

    def __init__(self, backbone, *, variant: Literal["image", "language_image"] = "image",
                 prompt_length: int = 10, text_context: int = 16, num_centroids: int = 5,
                 epochs: int = 30, lr: float = 0.01, weight_decay: float = 2e-4,
                 init_epochs: int = 30, init_lr: float = 0.01, init_weight_decay: float = 5e-4,
                 batch_size: int = 128, augment: bool = True,
                 schedule_unit: ScheduleUnit = "epoch"):
        super().__init__(backbone)
        self.variant = variant  # "image": S-iPrompts; "language_image": S-liPrompts (CLIP)
        self.prompt_length = prompt_length
        self.text_context = text_context  # M: CoOp context vectors per domain (language_image)
        self.num_centroids = num_centroids  # K: k-means centroids of each domain's features
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.init_epochs = init_epochs  # epochs of the first domain
        self.init_lr = init_lr  # learning rate of the first domain
        self.init_weight_decay = init_weight_decay  # weight decay of the first domain
        self.batch_size = batch_size
        self.augment = augment
        self.schedule_unit = schedule_unit  # cosine per epoch (official) or per batch
        self.net_: SPromptsNet | None = None
        self.centroids_: torch.Tensor | None = None  # (S, K, D) per-domain k-means centroids

    def _build(self) -> SPromptsNet:
        text = None
        if self.variant == "language_image":
            if getattr(self.backbone, "text", None) is None:
                raise ConfigError(f"sprompts variant 'language_image' (S-liPrompts) needs a CLIP "
                                  f"backbone with a text tower (clip_vit_b16), not "
                                  f"{self.backbone.name!r}; use variant='image' (S-iPrompts)")
            text = DomainContexts(frozen_copy(self.backbone.text), self.text_context)
        return SPromptsNet(frozen_copy(self.backbone.model), text)

    def _learn(self, task: Task, ctx: Context) -> None:
        if self.net_ is None:
            self.net_ = self._build()
        self.net_.to(ctx.device).add_domain(self.prompt_length, task.num_seen,
                                            ctx.generator(task.id, 1),
                                            task.class_names[:task.num_seen])
        self._train(task, ctx)
        self.net_.store_text_features(task.id)
        self._add_centroids(task.train, ctx, ctx.generator(task.id, 3))

    def _train(self, task: Task, ctx: Context) -> None:
        """CE on the task's classes through domain s = task.id's prompt and classifier only."""
        first = task.id == 0
        epochs = self.init_epochs if first else self.epochs
        if not epochs:
            return
        g = ctx.generator(task.id, 2)  # batch order and augmentation
        augment, domain = Augment() if self.augment else None, task.id

        def inputs(pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            x = self.backbone.preprocess(task.train, pos, augment, g)  # (B, 3, S, S)
            return x, torch.full((len(pos),), domain)  # images, domain ids (B,)

        fit(DomainTraining(self.net_, domain), inputs, torch.from_numpy(task.train.targets), ctx,
            epochs=epochs, lr=self.init_lr if first else self.lr, batch_size=self.batch_size,
            generator=g, weight_decay=self.init_weight_decay if first else self.weight_decay,
            loss_fn=lambda z, y: task_cross_entropy(z, y, task.classes),
            schedule_unit=self.schedule_unit, desc=f"sprompts domain {task.id}")

    def _add_centroids(self, train: Split, ctx: Context, generator: torch.Generator) -> None:
        """K-means on the domain's L2-normalised frozen features; the centroids are stored."""
        feats = F.normalize(ctx.features(self.backbone, train), dim=1)  # (N, D)
        cent = kmeans(feats, self.num_centroids, generator=generator)[None]  # (1, K, D)
        self.centroids_ = cent if self.centroids_ is None else torch.cat([self.centroids_, cent])

    def infer_task(self, split: Split, ctx: Context) -> np.ndarray:
        """(N,) the domain each sample of ``split`` is assigned to (nearest centroid, L1)."""
        query = F.normalize(ctx.features(self.backbone, split), dim=1)  # (N, D)
        return nearest_domain(query, self.centroids_).numpy()

    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        domains = torch.from_numpy(self.infer_task(split, ctx))  # (N,)

        def inputs(pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            return self.backbone.preprocess(split, pos), domains[torch.from_numpy(pos)]

        return predict_batches(self.net_, inputs, len(split), ctx)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"centroids": self.centroids_} | self.net_.learned_state()

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.net_ = self._build()
        self.net_.load_learned(state)
        self.centroids_ = state["centroids"]

    def parameter_counts(self) -> dict[str, int]:
        towers = [self.backbone.model]
        if self.variant == "language_image":
            towers.append(self.backbone.text)
        base = sum(p.numel() for t in towers for p in t.parameters())
        learned = 0 if self.net_ is None else self.net_.num_learned()
        return {"trainable": learned, "total": base + learned}
