"""S-Prompts, image-only variant S-iPrompts (Wang et al., "S-Prompts Learning with Pre-trained
Transformers: An Occam's Razor for Domain Incremental Learning", NeurIPS 2022; official code
iamwangyabin/S-Prompts ``methods/sprompt.py``, ``models/sinet.py``, ``configs/*.json``).

Every domain s of a domain-incremental stream gets its own prompt I_s (L tokens, shallow: inserted
after the class token at the input of the first block, without positional embedding) and its own
linear head W_s over the shared label space; the ViT is frozen. Domain s trains only (I_s, W_s)
with cross-entropy on its own data, fed through ``[CLS, I_s, patches]``; the feature is the
final-layer class token. Afterwards the L2-normalised frozen features f(x) of the domain's
training images are clustered into K centroids c_{s,1..K}. A test image picks the domain

    ŝ(x) = argmin_s min_k Σ_d |f(x)_d − c_{s,k,d}|          (L1, as ``_eval_cnn``)

and is classified by W_ŝ on the pass prompted with I_ŝ. f(x) is the cached frozen feature, so
a test image costs one prompted pass plus a cached feature; every sample picks its own domain.

Deviations: the published method is S-liPrompts on CLIP (a CoOp text prompt per domain as the
classifier); retain has no CLIP backbone yet, so this is S-iPrompts (``models/sinet.py``: image
prompt + linear head, on any timm ViT). K-means is retain's seeded k-means
(``retain.layers.kmeans``: k-means++, 10 restarts, as sklearn's KMeans with ``random_state=0``
but not bit-identical) on features of the un-augmented training images (the reference clusters
the augmented training loader). The cosine schedule decays per step, not per epoch. On a
class-incremental stream head s covers the classes seen up to task s; classes it never saw get
logit −inf. CORe50 and CDDB (the other benchmarks of the paper) are not available in retain.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..context import Context
from ..datasets.base import Split
from ..layers.heads import IncrementalLinear
from ..layers.inject import frozen_copy
from ..layers.kmeans import kmeans
from ..layers.prompts import block_inputs, insert_tokens, num_prefix_tokens
from ..params import Interval
from ..scenarios.base import Task
from ..training import fit, predict_batches, task_cross_entropy
from ..transforms import Augment
from .base import FROZEN_BACKBONE, GROWS, Method, register_method


@register_method("sprompts")
class SPrompts(Method):
    paper = "Wang et al., NeurIPS 2022 (arXiv 2207.12819)"
    tags = frozenset({FROZEN_BACKBONE, GROWS})
    constraints = {"prompt_length": Interval(1, None), "num_centroids": Interval(1, None),
                   "epochs": Interval(0, None), "lr": Interval(0, None, "neither"),
                   "weight_decay": Interval(0, None), "init_epochs": Interval(0, None),
                   "init_lr": Interval(0, None, "neither"),
                   "init_weight_decay": Interval(0, None), "batch_size": Interval(1, None)}

    def __init__(self, backbone, *, prompt_length: int = 10, num_centroids: int = 5,
                 epochs: int = 30, lr: float = 0.01, weight_decay: float = 2e-4,
                 init_epochs: int = 30, init_lr: float = 0.01, init_weight_decay: float = 5e-4,
                 batch_size: int = 128, augment: bool = True):
        super().__init__(backbone)
        self.prompt_length = prompt_length
        self.num_centroids = num_centroids
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.init_epochs = init_epochs
        self.init_lr = init_lr
        self.init_weight_decay = init_weight_decay
        self.batch_size = batch_size
        self.augment = augment
        self.net_: _SPromptsNet | None = None
        self.centroids_: torch.Tensor | None = None  # (S, K, D) per-domain k-means centroids

    def _learn(self, task: Task, ctx: Context) -> None:
        if self.net_ is None:
            self.net_ = _SPromptsNet(frozen_copy(self.backbone.model))
        self.net_.add_domain(self.prompt_length, task.num_seen, ctx.generator(task.id, 1))
        self._train(task, ctx)
        self._add_centroids(task.train, ctx, ctx.generator(task.id, 3))

    def _train(self, task: Task, ctx: Context) -> None:
        """CE on the task's classes through (I_s, W_s), s = task.id; all else is frozen."""
        first = task.id == 0
        epochs = self.init_epochs if first else self.epochs
        if not epochs:
            return
        g = ctx.generator(task.id, 2)  # batch order and augmentation
        augment, domain = Augment() if self.augment else None, task.id

        def inputs(pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            x = self.backbone.preprocess(task.train, pos)  # (B, 3, S, S)
            x = augment(x, g) if augment is not None else x
            return x, torch.full((len(pos),), domain)  # images, domain ids (B,)

        fit(self.net_, inputs, torch.from_numpy(task.train.targets), ctx, epochs=epochs,
            lr=self.init_lr if first else self.lr, batch_size=self.batch_size, generator=g,
            weight_decay=self.init_weight_decay if first else self.weight_decay,
            loss_fn=lambda z, y: task_cross_entropy(z, y, task.classes),
            desc=f"sprompts domain {task.id}")

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
        state = {"prompts": torch.stack(list(self.net_.prompts)).detach(),  # (S, L, D)
                 "centroids": self.centroids_}  # (S, K, D)
        for s, head in enumerate(self.net_.heads):
            state[f"head.{s}.weight"] = head.weight.detach()  # (C_s, D)
            state[f"head.{s}.bias"] = head.bias.detach()  # (C_s,)
        return state

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.net_ = _SPromptsNet(frozen_copy(self.backbone.model))
        for s, prompt in enumerate(state["prompts"]):
            self.net_.add_domain(prompt.shape[0], state[f"head.{s}.weight"].shape[0],
                                 torch.Generator())  # overwritten below
            with torch.no_grad():
                self.net_.prompts[s].copy_(prompt)
                self.net_.heads[s].weight.copy_(state[f"head.{s}.weight"])
                self.net_.heads[s].bias.copy_(state[f"head.{s}.bias"])
        self.centroids_ = state["centroids"]

    def parameter_counts(self) -> dict[str, int]:
        base = sum(p.numel() for p in self.backbone.model.parameters())
        learned = 0 if self.net_ is None else self.net_.num_learned()
        return {"trainable": learned, "total": base + learned}


def nearest_domain(query: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N,) argmin_s min_k ‖q − c_{s,k}‖₁ for queries (N, D) and centroids (S, K, D) (ties to
    the lower domain)."""
    s, k, d = centroids.shape
    dist = torch.cdist(query.double(), centroids.reshape(s * k, d).double(), p=1)  # (N, S·K)
    return dist.view(-1, s, k).amin(2).argmin(1)  # (N,)


class _SPromptsNet(nn.Module):
    """The frozen ViT copy, one prompt and one head per domain: (images, domains) -> logits."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.prompts = nn.ParameterList()  # I_s (L, D) each
        self.heads = nn.ModuleList()  # W_s over the classes seen up to domain s

    def train(self, mode: bool = True) -> _SPromptsNet:
        super().train(mode)
        self.vit.eval()  # the frozen ViT never trains (the reference trains in eval mode too)
        return self

    def add_domain(self, length: int, num_classes: int,
                   generator: torch.Generator | None = None) -> None:
        """A new trainable (I_s, W_s) with nn.Linear's default init (U(±1/√D), as
        ``nn.Linear(embd_dim, prompt_length).weight``); earlier ones are frozen."""
        for p in [*self.prompts, *self.heads.parameters()]:
            p.requires_grad_(False)
        dim = self.vit.embed_dim
        device = next(self.vit.parameters()).device
        bound = dim ** -0.5
        prompt = torch.empty(length, dim).uniform_(-bound, bound, generator=generator)
        self.prompts.append(nn.Parameter(prompt.to(device)))  # (L, D)
        head = IncrementalLinear(dim)
        head.expand(num_classes, generator)
        self.heads.append(head.to(device))

    def num_learned(self) -> int:
        return sum(p.numel() for p in [*self.prompts, *self.heads.parameters()])

    def forward(self, x: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack(list(self.prompts))[domains]  # (B, L, D)
        at = num_prefix_tokens(self.vit)
        with block_inputs(self.vit, {0: lambda seq: insert_tokens(seq, tokens, at)}):
            feat = self.vit.forward_features(x)[:, 0]  # (B, D) class token
        return self.logits(feat, domains)

    def logits(self, feat: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        """(B, C) scores of each sample by its own domain's head (−inf beyond its classes)."""
        out = feat.new_full((len(feat), self.heads[-1].num_classes), float("-inf"))  # (B, C)
        for s in domains.unique().tolist():
            rows = domains == s
            z = self.heads[s](feat[rows])  # (b, C_s)
            out[rows, : z.shape[1]] = z
        return out
