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
un-augmented training images (the reference clusters the augmented training loader). The cosine
schedule decays per step, not per epoch. The official ``SliNet.forward`` scores training batches
with ``classifier_pool[-1]`` while only ``classifier_pool[numtask-1]`` has gradients (so on
DomainNet the text contexts of all but the last domain never train); here domain s trains and
uses ctx_s, as the paper describes. On a class-incremental stream the classifier of domain s
covers the classes seen up to task s; classes it never saw get logit −inf. CORe50 and CDDB (the
other benchmarks of the paper) are not available in retain.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..context import Context
from ..datasets.base import Split
from ..errors import ConfigError
from ..layers.coop import DomainContexts
from ..layers.heads import IncrementalLinear
from ..layers.inject import frozen_copy
from ..layers.kmeans import kmeans
from ..layers.prompts import insert_tokens, num_prefix_tokens
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
                   "init_weight_decay": Interval(0, None), "batch_size": Interval(1, None),
                   "text_context": Interval(1, None)}

    def __init__(self, backbone, *, variant: Literal["image", "language_image"] = "image",
                 prompt_length: int = 10, text_context: int = 16, num_centroids: int = 5,
                 epochs: int = 30, lr: float = 0.01, weight_decay: float = 2e-4,
                 init_epochs: int = 30, init_lr: float = 0.01, init_weight_decay: float = 5e-4,
                 batch_size: int = 128, augment: bool = True):
        super().__init__(backbone)
        self.variant = variant  # "image": S-iPrompts; "language_image": S-liPrompts (CLIP)
        self.prompt_length = prompt_length
        self.text_context = text_context  # M: CoOp context vectors per domain (language_image)
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

    def _build(self) -> _SPromptsNet:
        text = None
        if self.variant == "language_image":
            if getattr(self.backbone, "text", None) is None:
                raise ConfigError(f"sprompts variant 'language_image' (S-liPrompts) needs a CLIP "
                                  f"backbone with a text tower (clip_vit_b16), not "
                                  f"{self.backbone.name!r}; use variant='image' (S-iPrompts)")
            text = DomainContexts(frozen_copy(self.backbone.text), self.text_context)
        return _SPromptsNet(frozen_copy(self.backbone.model), text)

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
            x = self.backbone.preprocess(task.train, pos)  # (B, 3, S, S)
            x = augment(x, g) if augment is not None else x
            return x, torch.full((len(pos),), domain)  # images, domain ids (B,)

        fit(_Training(self.net_, domain), inputs, torch.from_numpy(task.train.targets), ctx,
            epochs=epochs, lr=self.init_lr if first else self.lr, batch_size=self.batch_size,
            generator=g, weight_decay=self.init_weight_decay if first else self.weight_decay,
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


def nearest_domain(query: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N,) argmin_s min_k ‖q − c_{s,k}‖₁ for queries (N, D) and centroids (S, K, D) (ties to
    the lower domain)."""
    s, k, d = centroids.shape
    dist = torch.cdist(query.double(), centroids.reshape(s * k, d).double(), p=1)  # (N, S·K)
    return dist.view(-1, s, k).amin(2).argmin(1)  # (N,)


@contextmanager
def prompted(vit: nn.Module, tokens: torch.Tensor) -> Iterator[None]:
    """Within the block, ``tokens`` (B, L, D) enter after the class token of the sequence that
    reaches ``norm_pre`` (after the positional embedding, before CLIP's ``ln_pre``)."""
    at = num_prefix_tokens(vit)
    handle = vit.norm_pre.register_forward_pre_hook(
        lambda module, args: (insert_tokens(args[0], tokens, at), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


class _SPromptsNet(nn.Module):
    """The frozen image tower, one prompt and one classifier per domain: (images, domains) ->
    logits. Classifier: a linear head (``text`` None) or a CoOp context of ``text``."""

    def __init__(self, vit: nn.Module, text: DomainContexts | None = None):
        super().__init__()
        self.vit, self.text = vit, text
        self.prompts = nn.ParameterList()  # I_s (L, D) each
        self.heads = nn.ModuleList()  # W_s over the classes seen up to domain s (image variant)
        self.num_classes: list[int] = []  # C_s
        self.text_features: list[torch.Tensor] = []  # (C_s, E) stored after training domain s

    def train(self, mode: bool = True) -> _SPromptsNet:
        super().train(mode)
        self.vit.eval()  # the frozen towers never train (the reference trains in eval mode too)
        if self.text is not None:
            self.text.text.eval()
        return self

    def add_domain(self, length: int, num_classes: int, generator: torch.Generator | None = None,
                   class_names: tuple[str, ...] = ()) -> None:
        """A new trainable prompt I_s with nn.Linear's default init (U(±1/√D), as
        ``nn.Linear(embd_dim, prompt_length).weight``) and a new head (nn.Linear's init) or
        text context (N(0, 0.02²)); the earlier ones are frozen."""
        for p in [*self.prompts, *self.heads.parameters()]:
            p.requires_grad_(False)
        dim, device = self.vit.embed_dim, next(self.vit.parameters()).device
        bound = dim ** -0.5
        prompt = torch.empty(length, dim).uniform_(-bound, bound, generator=generator)
        self.prompts.append(nn.Parameter(prompt.to(device)))  # (L, D)
        self.num_classes.append(num_classes)
        if self.text is None:
            head = IncrementalLinear(dim)
            head.expand(num_classes, generator)
            self.heads.append(head.to(device))
        else:
            if class_names:
                self.text.set_classes(class_names)
            self.text.add(generator)

    def store_text_features(self, s: int) -> None:
        """Encode domain s's class texts once (frozen from now on) for prediction."""
        if self.text is not None:
            with torch.no_grad():
                self.text_features.append(self.text.features(s, self.num_classes[s]))

    def num_learned(self) -> int:
        own = [*self.prompts, *self.heads.parameters()]
        own += [] if self.text is None else list(self.text.contexts)
        return sum(p.numel() for p in own)

    def forward(self, x: torch.Tensor, domains: torch.Tensor,
                texts: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (B, C) of each sample by its own domain; ``texts`` overrides the stored text
        features of some domains (training)."""
        tokens = torch.stack(list(self.prompts))[domains]  # (B, L, D)
        with prompted(self.vit, tokens):
            if self.text is None:
                feat = self.vit.forward_features(x)[:, 0]  # (B, D) class token
            else:
                feat = F.normalize(self.vit(x), dim=-1)  # (B, E) CLIP image embedding
        return self.logits(feat, domains, texts or {})

    def logits(self, feat: torch.Tensor, domains: torch.Tensor,
               texts: dict[int, torch.Tensor]) -> torch.Tensor:
        """(B, C) scores of each sample by its own domain's classifier (−inf beyond its
        classes)."""
        out = feat.new_full((len(feat), self.num_classes[-1]), float("-inf"))  # (B, C)
        for s in domains.unique().tolist():
            rows = domains == s
            if self.text is None:
                z = self.heads[s](feat[rows])  # (b, C_s)
            else:
                t = texts[s] if s in texts else self.text_features[s]  # (C_s, E)
                z = self.text.text.logit_scale.exp() * feat[rows] @ t.to(feat).T  # (b, C_s)
            out[rows, : z.shape[1]] = z
        return out

    def learned_state(self) -> dict[str, torch.Tensor]:
        state = {"prompts": torch.stack(list(self.prompts)).detach(),  # (S, L, D)
                 "num_classes": torch.tensor(self.num_classes)}  # (S,)
        for s, head in enumerate(self.heads):
            state[f"head.{s}.weight"] = head.weight.detach()  # (C_s, D)
            state[f"head.{s}.bias"] = head.bias.detach()  # (C_s,)
        if self.text is not None:
            state["contexts"] = torch.stack(list(self.text.contexts)).detach()  # (S, M, W)
            state["tokens"] = self.text.tokens  # (C, L)
            state |= {f"text.{s}": t for s, t in enumerate(self.text_features)}  # (C_s, E)
        return state

    def load_learned(self, state: dict[str, torch.Tensor]) -> None:
        prompts = state["prompts"]
        counts = state.get("num_classes")
        for s, prompt in enumerate(prompts):
            n = int(counts[s]) if counts is not None else state[f"head.{s}.weight"].shape[0]
            self.add_domain(prompt.shape[0], n, torch.Generator())  # overwritten below
            with torch.no_grad():
                self.prompts[s].copy_(prompt)
                if self.text is None:
                    self.heads[s].weight.copy_(state[f"head.{s}.weight"])
                    self.heads[s].bias.copy_(state[f"head.{s}.bias"])
                else:
                    self.text.contexts[s].copy_(state["contexts"][s])
        if self.text is not None:
            self.text.tokens = state["tokens"]
            self.text_features = [state[f"text.{s}"] for s in range(len(prompts))]


class _Training(nn.Module):
    """The net while domain s trains: its text features are re-encoded from ctx_s at every
    step (with gradients); a head needs nothing extra."""

    def __init__(self, net: _SPromptsNet, s: int):
        super().__init__()
        self.net, self.s = net, s

    def forward(self, x: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        if self.net.text is None:
            return self.net(x, domains)
        texts = {self.s: self.net.text.features(self.s, self.net.num_classes[self.s])}
        return self.net(x, domains, texts)
