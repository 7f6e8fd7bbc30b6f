"""PROOF's pieces (Zhou et al., "Learning without Forgetting for Vision-Language Models", TPAMI
2025; zhoudw-zdw/PROOF ``convs/projections.py``, ``utils/inc_net.py::Proof_Net``).

- :class:`SummedProjections`: one linear E->E projection per task; the projected feature is the
  sum over all of them (``Proof_Net.encode_image`` / ``encode_text``).
- :class:`FusionAttention`: the one-head self-attention with residual and LayerNorm of
  ``MultiHeadAttention(1, E, E, E, dropout=0.1)``.
- :func:`fuse`: the sequence [image; class texts; class prototypes; context prompts] through the
  fusion module, per sample, split back into (image', texts', prototypes').
- :func:`clip_contrastive`: open_clip's symmetric ``ClipLoss`` on one batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SummedProjections(nn.Module):
    """x -> Σ_t W_t x + b_t over the task projections; ``add`` freezes the older ones unless
    asked not to (the official code keeps training old *text* projections)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.projs = nn.ModuleList()

    def add(self, generator: torch.Generator | None = None, freeze_old: bool = True) -> None:
        for p in self.projs.parameters():
            p.requires_grad_(not freeze_old)
        proj = nn.Linear(self.dim, self.dim)
        bound = 1 / math.sqrt(self.dim)  # nn.Linear's default init, drawn from `generator`
        with torch.no_grad():
            proj.weight.uniform_(-bound, bound, generator=generator)
            proj.bias.uniform_(-bound, bound, generator=generator)
        self.projs.append(proj.to(self._device()))

    def _device(self) -> torch.device:
        return next(self.projs.parameters()).device if len(self.projs) else torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([p(x) for p in self.projs]).sum(0)  # (..., E)


class FusionAttention(nn.Module):
    """One-head scaled dot-product self-attention, out = LN(x + Dropout(fc(attn(x))))."""

    def __init__(self, dim: int, dropout: float = 0.1,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.dropout = dropout
        self.w_q, self.w_k, self.w_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        with torch.no_grad():  # the official initialisation
            for lin in (self.w_q, self.w_k, self.w_v):
                lin.weight.normal_(0, math.sqrt(2.0 / (2 * dim)), generator=generator)
            std = math.sqrt(2.0 / (2 * dim))  # xavier_normal_ of a square matrix
            self.fc.weight.normal_(0, std, generator=generator)
            self.fc.bias.uniform_(-dim**-0.5, dim**-0.5, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.w_q(x), self.w_k(x), self.w_v(x)  # (B, L, E)
        attn = (q @ k.transpose(1, 2) / math.sqrt(x.shape[-1])).softmax(-1)  # (B, L, L)
        attn = F.dropout(attn, self.dropout, self.training)
        out = F.dropout(self.fc(attn @ v), self.dropout, self.training)  # (B, L, E)
        return self.norm(out + x)  # (B, L, E)


def fuse(attn: FusionAttention, image: torch.Tensor, texts: torch.Tensor,
         protos: torch.Tensor, prompts: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """image (B, E), texts (C, E), protos (C, E), prompts (P, E) -> image' (B, E),
    texts' (B, C, E), protos' (B, C, E): each sample attends over its own sequence
    [image; texts; protos; prompts] (``Proof_Net.forward_transformer``)."""
    B, C = len(image), len(texts)
    rest = torch.cat([texts, protos, prompts]).expand(B, -1, -1)  # (B, 2C+P, E)
    out = attn(torch.cat([image[:, None], rest], 1))  # (B, 1+2C+P, E)
    return out[:, 0], out[:, 1:1 + C], out[:, 1 + C:1 + 2 * C]


def fused_logits(image: torch.Tensor, texts: torch.Tensor, protos: torch.Tensor,
                 batch_mean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(image'·texts'ᵀ, image'·protos'ᵀ), each (B, C). ``batch_mean``: average texts' and
    protos' over the batch first, as the official code (a sample's logits then depend on its
    batch)."""
    if batch_mean:
        return image @ texts.mean(0).T, image @ protos.mean(0).T  # (B, C), (B, C)
    return (torch.einsum("be,bce->bc", image, texts),
            torch.einsum("be,bce->bc", image, protos))  # (B, C), (B, C)


def clip_contrastive(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor
                     ) -> torch.Tensor:
    """open_clip ``ClipLoss``: sample b's image matches text b. image, text (B, E) unit-norm."""
    logits = scale * image @ text.T  # (B, B)
    labels = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
