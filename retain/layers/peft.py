"""Parameter-efficient modules for timm's ``VisionTransformer``, injected into one instance
without forking its code (spec ``ptm-methods.md`` §1):

* VPT shallow/deep, official or PILOT placement (``retain.layers.vpt``, Jia et al., ECCV 2022);
* prefix tuning with per-sample prefixes (``retain.layers.prefix``, Li & Liang, ACL 2021);
* AdaptFormer adapters (``retain.layers.adapter``, Chen et al., NeurIPS 2022);
* SSF (``retain.layers.ssf``, Lian et al., NeurIPS 2022).

Each ``attach_*(vit, ...)`` wraps submodules of ``vit`` in place and returns the module that
holds exactly the new parameters (train those, freeze the rest; its ``state_dict`` is what to
save). ``detach(vit, module)`` restores the original modules; ``injected(vit, module)`` attaches
an existing module for a ``with`` block. :func:`attach` creates one by its registered name.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from ..registry import Registry
from .adapter import Adapter, AdapterSet, attach_adapter
from .inject import detach, injected
from .prefix import (
    PrefixAttention,
    PrefixPrompts,
    attach_prefix,
    forward_with_prefix,
    prefix_attention,
    supplied_prefixes,
)
from .ssf import SSF, ScaleShift, attach_ssf, ssf_sites
from .vpt import VisualPrompts, attach_vpt

__all__ = ["PEFT_MODULES", "SSF", "Adapter", "AdapterSet", "PrefixAttention", "PrefixPrompts",
           "ScaleShift", "VisualPrompts", "attach", "attach_adapter", "attach_prefix",
           "attach_ssf", "attach_vpt", "count_parameters", "detach", "forward_with_prefix",
           "injected", "prefix_attention", "ssf_sites", "supplied_prefixes"]

PEFT_MODULES: Registry[Callable[..., nn.Module]] = Registry("PEFT module")
PEFT_MODULES.register("adapter")(attach_adapter)
PEFT_MODULES.register("ssf")(attach_ssf)
PEFT_MODULES.register("vpt_shallow")(partial(attach_vpt, deep=False))
PEFT_MODULES.register("vpt_deep")(partial(attach_vpt, deep=True))


def attach(vit: nn.Module, name: str, **options) -> nn.Module:
    """Inject the PEFT module registered as ``name`` into ``vit`` (in place) and return it;
    ``options`` are the keyword arguments of its ``attach_*`` function."""
    return PEFT_MODULES.get(name)(vit, **options)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters of ``module`` (each shared one counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
