"""Visual prompt tuning (Jia et al., "Visual Prompt Tuning", ECCV 2022), injected into a timm ViT.

Shallow: ``p`` learned tokens enter the sequence once, before the first block. Deep: block ``l``
gets its own ``P_l``; the prompt outputs of block ``l-1`` are discarded and replaced by ``P_l``.
The prompt tokens are dropped before the final norm, so the pooled feature (CLS, or the average
of the patch tokens) is computed from the original tokens only. No positional embedding is added
to prompts. Two placements:

* ``"official"`` (KMnP/vpt ``vit_prompt/vit.py``): ``[CLS (+ registers), P, patches]``,
  ``P ~ U(-v, v)``, ``v = sqrt(6 / (3·h·w + D))`` for ``h×w`` patches (≈0.0625 on ViT-B/16);
  optional prompt dropout (0 by default, as there).
* ``"pilot"`` (LAMDA-PILOT ``backbone/vpt.py``, used by APER-VPT): ``[CLS, patches, P]``,
  ``P = 0``.

Parameters: ``p·D`` shallow, ``depth·p·D`` deep (ViT-B/16, p=5: 3,840 and 46,080).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .inject import Injected, check_vit, factory_kwargs, wrap

Placement = Literal["official", "pilot"]


class VisualPrompts(nn.Module):
    """Prompt tokens ``prompts`` (layers, p, D): one set (shallow) or one per block (deep)."""

    def __init__(self, num_tokens: int, dim: int, layers: int = 1, *,
                 placement: Placement = "official", num_prefix_tokens: int = 1,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        if placement not in ("official", "pilot"):
            raise ValueError(f"placement must be 'official' or 'pilot', got {placement!r}")
        self.placement = placement
        self.num_prefix_tokens = num_prefix_tokens
        self.prompts = nn.Parameter(torch.zeros(layers, num_tokens, dim, device=device,
                                                dtype=dtype))  # (L, p, D)
        self.drop = nn.Dropout(dropout)

    @property
    def num_tokens(self) -> int:
        return self.prompts.shape[1]

    def _start(self, length: int) -> int:
        """Index of the first prompt token in a sequence of ``length`` tokens with prompts."""
        if self.placement == "official":
            return self.num_prefix_tokens
        return length - self.num_tokens

    def insert(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """(B, N, D) -> (B, N+p, D): the prompts of ``layer`` put into the sequence."""
        at = self._start(x.shape[1] + self.num_tokens)
        p = self.prompts[layer].to(x.dtype).expand(x.shape[0], -1, -1)  # (B, p, D)
        return torch.cat([x[:, :at], self.drop(p), x[:, at:]], dim=1)  # (B, N+p, D)

    def remove(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N+p, D) -> (B, N, D)."""
        at = self._start(x.shape[1])
        return torch.cat([x[:, :at], x[:, at + self.num_tokens:]], dim=1)  # (B, N, D)

    def inject(self, vit: nn.Module) -> None:
        check_vit(vit)
        if self.prompts.shape[0] not in (1, len(vit.blocks)):
            raise ValueError(f"{self.prompts.shape[0]} prompt layers for {len(vit.blocks)} blocks")
        for layer in range(self.prompts.shape[0]):
            wrap(vit, f"blocks.{layer}", lambda b, layer=layer: _PromptedBlock(b, self, layer),
                 outermost=True)
        wrap(vit, "norm", lambda norm: _PromptsDropped(norm, self), outermost=True)


class _PromptedBlock(Injected):
    """Block ``layer`` fed with ``P_layer`` (inserted at block 0, replacing old prompts later)."""

    def __init__(self, base: nn.Module, peft: VisualPrompts, layer: int):
        super().__init__(base, peft)
        self.layer = layer

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.layer > 0:
            x = self.peft.remove(x)  # (B, N, D)
        return self.base(self.peft.insert(x, self.layer), *args, **kwargs)  # (B, N+p, D)


class _PromptsDropped(Injected):
    """The final norm, applied after the prompt tokens are dropped."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(self.peft.remove(x))  # (B, N, D)


def attach_vpt(vit: nn.Module, num_tokens: int = 5, *, deep: bool = False,
               placement: Placement = "official", dropout: float = 0.0,
               generator: torch.Generator | None = None) -> VisualPrompts:
    """Inject VPT-shallow (or VPT-deep) into ``vit`` in place; return the prompts (to train)."""
    check_vit(vit)
    vpt = VisualPrompts(num_tokens, vit.embed_dim, len(vit.blocks) if deep else 1,
                        placement=placement, num_prefix_tokens=vit.num_prefix_tokens,
                        dropout=dropout, **factory_kwargs(vit))
    if placement == "official":
        h, w = vit.patch_embed.patch_size
        bound = math.sqrt(6.0 / (3 * h * w + vit.embed_dim))
        nn.init.uniform_(vpt.prompts, -bound, bound, generator=generator)
    vpt.inject(vit)
    return vpt
