"""AdaptFormer adapters (Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable
Visual Recognition", NeurIPS 2022) injected into a timm ViT, as in APER-Adapter (Zhou et al.,
IJCV 2024), RanPAC and EASE (LAMDA-PILOT ``backbone/vit_adapter.py``).

PILOT's setting (``ffn_option="parallel"``, ``ffn_adapter_layernorm_option="none"``, init
``"lora"``, scalar 0.1): in every block, with ``x`` the output of the attention residual,

    out = x + drop_path(ls2(mlp(norm2(x)))) + s · up(dropout(ReLU(down(x))))

The adapter reads ``x`` itself, not ``norm2(x)``, and is added outside drop-path. ``down`` is
Kaiming-uniform (a=√5), ``up`` and both biases are zero, so the ViT is unchanged at the start.
Parameters per block ``2·D·r + r + D`` (ViT-B/16, r=64: 99,136; 12 blocks 1,189,632).
EASE keeps one :class:`AdapterSet` per task on one frozen trunk: ``injected(vit, adapters)``
(``retain.layers.inject``) attaches a set for a ``with`` block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .inject import Injected, check_vit, factory_kwargs, wrap


class Adapter(nn.Module):
    """s · up(dropout(ReLU(down(x)))), a bottleneck of width ``bottleneck``."""

    def __init__(self, dim: int, bottleneck: int = 64, *, scale: float = 0.1,
                 dropout: float = 0.1, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        self.scale = scale
        self.dropout = dropout

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PILOT's "lora" init: the adapter outputs zero."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        for t in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.relu(self.down(x)), self.dropout, self.training)  # (B, N, r)
        return self.scale * self.up(h)  # (B, N, D)


class AdapterSet(nn.Module):
    """One :class:`Adapter` per block (``adapters``)."""

    def __init__(self, dim: int, depth: int, bottleneck: int = 64, *, scale: float = 0.1,
                 dropout: float = 0.1, device=None, dtype=None):
        super().__init__()
        self.adapters = nn.ModuleList(
            Adapter(dim, bottleneck, scale=scale, dropout=dropout, device=device, dtype=dtype)
            for _ in range(depth))

    def inject(self, vit: nn.Module) -> None:
        check_vit(vit)
        if len(self.adapters) != len(vit.blocks):
            raise ValueError(f"{len(self.adapters)} adapters for {len(vit.blocks)} blocks")
        for i, adapter in enumerate(self.adapters):
            wrap(vit, f"blocks.{i}", lambda b, a=adapter: _AdaptedBlock(b, a))


class _AdaptedBlock(Injected):
    """A timm ``Block`` with an adapter parallel to its MLP."""

    def __init__(self, base: nn.Module, peft: Adapter):
        from timm.models.vision_transformer import Block

        if type(base) is not Block:
            raise TypeError(f"adapters need timm's pre-norm Block, got {type(base).__name__}")
        super().__init__(base, peft)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        b = self.base
        attn = b.attn(b.norm1(x), attn_mask=attn_mask, is_causal=is_causal)  # (B, N, D)
        x = x + b.drop_path1(b.ls1(attn))  # (B, N, D)
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))) + self.peft(x)  # (B, N, D)


def attach_adapter(vit: nn.Module, bottleneck: int = 64, *, scale: float = 0.1,
                   dropout: float = 0.1,
                   generator: torch.Generator | None = None) -> AdapterSet:
    """Inject a new adapter into every block of ``vit`` in place; return them (to train)."""
    check_vit(vit)
    adapters = AdapterSet(vit.embed_dim, len(vit.blocks), bottleneck, scale=scale,
                          dropout=dropout, **factory_kwargs(vit))
    for adapter in adapters.adapters:
        adapter.reset_parameters(generator)
    adapters.inject(vit)
    return adapters
