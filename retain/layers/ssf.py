"""SSF (Lian et al., "Scaling & Shifting Your Features: A New Baseline for Efficient Model
Tuning", NeurIPS 2022) injected into a timm ViT, as in APER-SSF (Zhou et al., IJCV 2024;
LAMDA-PILOT ``backbone/vit_ssf.py``).

``y = γ ⊙ x + β`` on the last dimension, after the patch embedding (after its ``norm``, an
identity in most ViTs; PILOT scales after the projection, and again after that norm if there is
one), in every block after ``norm1``, ``attn.qkv`` (3D), ``attn.proj``, ``norm2``, ``mlp.fc1``
(hidden) and ``mlp.fc2``, and after the final ``norm``; ``γ ~ N(1, 0.02)``, ``β ~ N(0, 0.02)``
(or ``init="identity"``).
ViT-B/16: 2·(768 + 12·(4·768 + 2304 + 3072) + 768) = 205,824 parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from .inject import Injected, check_vit, factory_kwargs, unwrap, wrap

Init = Literal["normal", "identity"]


class ScaleShift(nn.Module):
    """``scale ⊙ x + shift`` over the last dimension."""

    def __init__(self, dim: int, *, device=None, dtype=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))  # (C,)
        self.shift = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))  # (C,)

    @torch.no_grad()
    def reset_parameters(self, init: Init = "normal",
                         generator: torch.Generator | None = None) -> None:
        nn.init.ones_(self.scale)
        nn.init.zeros_(self.shift)
        if init == "normal":
            nn.init.normal_(self.scale, 1.0, 0.02, generator=generator)
            nn.init.normal_(self.shift, 0.0, 0.02, generator=generator)
        elif init != "identity":
            raise ValueError(f"init must be 'normal' or 'identity', got {init!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift  # (..., C)


class SSF(nn.Module):
    """One :class:`ScaleShift` per place (``dims``: dotted path in the ViT -> feature width);
    in ``sites`` under the path with ``_`` for ``.``."""

    def __init__(self, dims: Mapping[str, int], *, device=None, dtype=None):
        super().__init__()
        self.paths = tuple(dims)
        self.sites = nn.ModuleDict({_key(p): ScaleShift(d, device=device, dtype=dtype)
                                    for p, d in dims.items()})

    def inject(self, vit: nn.Module) -> None:
        check_vit(vit)
        for path in self.paths:
            site = self.sites[_key(path)]
            wrap(vit, path, lambda m, site=site: _ScaleShifted(m, site))


class _ScaleShifted(Injected):
    """The output of ``base``, scaled and shifted."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.peft(self.base(*args, **kwargs))


def _key(path: str) -> str:
    return path.replace(".", "_")


def ssf_sites(vit: nn.Module) -> dict[str, int]:
    """PILOT's SSF places in a timm ViT and their widths."""
    dim = vit.embed_dim
    sites = {"patch_embed.norm": dim}  # the last step of the patch embedding
    for i, block in enumerate(vit.blocks):
        block = unwrap(block)
        qkv, fc1 = unwrap(unwrap(block.attn).qkv), unwrap(unwrap(block.mlp).fc1)
        sites |= {f"blocks.{i}.norm1": dim, f"blocks.{i}.attn.qkv": qkv.out_features,
                  f"blocks.{i}.attn.proj": dim, f"blocks.{i}.norm2": dim,
                  f"blocks.{i}.mlp.fc1": fc1.out_features, f"blocks.{i}.mlp.fc2": dim}
    return sites | {"norm": dim}


def attach_ssf(vit: nn.Module, *, init: Init = "normal",
               generator: torch.Generator | None = None) -> SSF:
    """Inject SSF into ``vit`` in place; return the scales and shifts (to train)."""
    check_vit(vit)
    ssf = SSF(ssf_sites(vit), **factory_kwargs(vit))
    for site in ssf.sites.values():
        site.reset_parameters(init, generator)
    ssf.inject(vit)
    return ssf
