"""Multi-layer representations of a timm ViT (LayUP, Ahrens et al., TMLR 2024)."""

from __future__ import annotations

import torch
from torch import nn

from ..backbones import Backbone


class LastBlocksCLS(nn.Module):
    """(B, k·D): the CLS token output by each of the last ``k`` blocks, before the final norm,
    concatenated. Forward hooks read the blocks' outputs during one ordinary forward pass."""

    def __init__(self, vit: nn.Module, k: int):
        super().__init__()
        if not hasattr(vit, "blocks") or not 1 <= k <= len(vit.blocks):
            raise ValueError(f"need a ViT with at least {k} blocks")
        self.vit = vit
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda m, i, out: cls.append(out[:, 0]))
                 for b in self.vit.blocks[-self.k:]]
        try:
            self.vit.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        return torch.cat(cls, dim=1)  # (B, k·D)


def multilayer_backbone(base: Backbone, k: int) -> Backbone:
    """``base`` seen through the CLS tokens of its last ``k`` blocks."""
    model = LastBlocksCLS(base.model, k).eval()
    name = f"{base.name}[cls-last{k}]"
    ident = dict(base.identity, name=name, layers=k)
    return Backbone(name, model, k * base.feature_dim, base.preprocess, ident)
