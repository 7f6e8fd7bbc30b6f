"""DyTox's network and training pieces (Douillard et al., "DyTox: Transformers for Continual
Learning with DYnamic TOken eXpansion", CVPR 2022, arXiv 2111.11326; official code
arthurdouillard/dytox @4da25c1), used by ``retain.methods.dytox``.

- ``build_dytox``: the shared encoder (timm's ``VisionTransformer`` without class token or final
  norm, plain self-attention instead of ConViT's GPSA, LayerNorm eps 1e-5 as ConViT's
  ``nn.LayerNorm``) + one task-attention block;
- ``DyToxNet``: one task token and one LayerNorm → Linear head (``ContinualClassifier``) per
  task, the divergence head on the last token (training only);
- ``dytox_loss``: (1 − α) BCE + α τ²·KL + λ_div BCE_div with α = n_old / n_all
  (``engine.py::forward``). Not ``retain.layers.distill.kd_loss``: that one is PyCIL's
  cross-entropy without τ², averaged over the batch only; DyTox's is ``kl_div(reduction='mean')``,
  i.e. also divided by the number of old classes (pitfall 24);
- ``soft_targets`` / ``mixup`` (timm's ``Mixup`` with label smoothing, batch flipped) and
  ``crop_flip`` (RandomCrop with padding + horizontal flip), on preprocessed batches.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .rows import keyed_draws
from .task_attention import TaskAttentionBlock


def build_dytox(image_size: int, channels: int, *, patch_size: int, embed_dim: int, depth: int,
                num_heads: int, mlp_ratio: float, drop_path: float) -> DyToxNet:
    """Encoder of ``depth`` SABs (stochastic depth linear from 0 to ``drop_path`` over SABs and
    TAB, as the official ``drop_path_rate``) + one TAB, without any task yet. Its stochastic
    depth draws per row of the global batch (``retain.layers.rows``: several processes split a
    batch and draw the masks of one process)."""
    encoder = VisionTransformer(
        img_size=image_size, patch_size=patch_size, in_chans=channels, num_classes=0,
        global_pool="", class_token=False, final_norm=False, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=False,
        drop_path_rate=drop_path * (depth - 1) / depth,
        norm_layer=nn.LayerNorm)  # ConViT's norm_layer 'layer': eps 1e-5 (timm's ViT: 1e-6)
    tab = TaskAttentionBlock(embed_dim, num_heads, mlp_ratio, drop_path=drop_path)
    return keyed_draws(DyToxNet(encoder, tab))


class DyToxNet(nn.Module):
    """Shared encoder + TAB; one task token and one LN → Linear head per task."""

    def __init__(self, encoder: VisionTransformer, tab: TaskAttentionBlock):
        super().__init__()
        self.encoder = encoder
        self.tab = tab
        self.tokens = nn.ParameterList()
        self.heads = nn.ModuleList()
        self.div_head: Head | None = None

    @property
    def num_classes(self) -> int:
        return sum(h.fc.out_features for h in self.heads)

    def add_task(self, num_classes: int, divergence: bool) -> None:
        """A new trunc-normal(0.02) token, a new head, and a fresh divergence head."""
        dim = self.encoder.embed_dim
        token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(token, std=0.02)
        self.tokens.append(token)
        self.heads.append(Head(dim, num_classes))
        self.div_head = Head(dim, num_classes + 1) if divergence else None

    def embeddings(self, x: torch.Tensor) -> list[torch.Tensor]:
        """e_1..e_t, each (B, D): every task token attends to the same encoder output."""
        patches = self.encoder.forward_features(x)  # (B, N, D)
        return [self.tab(t.expand(len(x), -1, -1), patches)[:, 0] for t in self.tokens]

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits over all seen classes (B, C) and divergence logits (B, |C_t| + 1) or None."""
        e = self.embeddings(x)
        logits = torch.cat([h(ei) for h, ei in zip(self.heads, e, strict=True)], dim=1)
        div = None if self.div_head is None else self.div_head(e[-1])
        return logits, div

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x)[0]  # (B, C)


class Head(nn.Module):
    """DyTox's ``ContinualClassifier``: LayerNorm then Linear."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(e))


class TaskEmbeddings(nn.Module):
    """``net`` → the concatenated task embeddings (B, t·D) (herding features)."""

    def __init__(self, net: DyToxNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.net.embeddings(x), dim=1)  # (B, t·D)


def dytox_loss(logits: torch.Tensor, div: torch.Tensor | None, old: torch.Tensor | None,
               target: torch.Tensor, *, tau: float, div_weight: float
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """(1 − α)·BCE + α·τ²·KL + λ_div·BCE_div with α = n_old / n_all (``engine.py::forward``).

    logits (B, n_all), div (B, n_new + 1) or None, old = teacher logits (B, n_old) or None,
    target (B, n_all) soft targets.
    """
    clf = F.binary_cross_entropy_with_logits(logits, target)
    if old is None:
        return clf, {"clf": clf.item(), "alpha": 0.0}
    n_old, n_all = old.shape[1], logits.shape[1]
    alpha = n_old / n_all
    kl = F.kl_div(F.log_softmax(logits[:, :n_old] / tau, dim=1), F.log_softmax(old / tau, dim=1),
                  reduction="sum", log_target=True)
    kd = tau**2 * kl / old.numel()  # kl_div(reduction='mean'): over batch x old classes
    loss = (1 - alpha) * clf + alpha * kd
    parts = {"clf": clf.item(), "kd": kd.item(), "alpha": alpha}
    if div is not None:
        div_target = torch.cat([target[:, :n_old].sum(1, keepdim=True), target[:, n_old:]], 1)
        div_loss = F.binary_cross_entropy_with_logits(div, div_target)  # (B, n_new + 1) targets
        loss = loss + div_weight * div_loss
        parts["div"] = div_loss.item()
    return loss, parts


def soft_targets(y: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot (B, C) with timm's label smoothing: off = s / C, on = 1 − s + s / C."""
    off = smoothing / num_classes
    return F.one_hot(y, num_classes).float() * (1 - smoothing) + off


def mixup(x: torch.Tensor, target: torch.Tensor, alpha: float, g: torch.Generator
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's batch MixUp: λ ~ Beta(α, α), each sample mixed with its mirror in the batch."""
    lam = float(np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))
                .beta(alpha, alpha))
    return lam * x + (1 - lam) * x.flip(0), lam * target + (1 - lam) * target.flip(0)


def crop_flip(x: torch.Tensor, g: torch.Generator, pad: int, flip: bool) -> torch.Tensor:
    """RandomCrop(S, padding=pad) and a horizontal flip with probability 1/2, per image."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, S+2p, S+2p)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=g).tolist()
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    if flip:
        mask = torch.rand(b, generator=g) < 0.5
        out[mask] = out[mask].flip(-1)
    return out  # (B, C, S, S)
