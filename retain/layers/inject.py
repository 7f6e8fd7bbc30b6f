"""Plumbing shared by the parameter-efficient modules injected into a timm ViT
(``retain.layers.{vpt,prefix,adapter,ssf}``; index and registry in ``retain.layers.peft``).

An injection replaces submodules of *one* ViT instance by small :class:`Injected` wrappers. A
wrapper holds the original submodule unchanged (``base``) and the parameter-efficient module, or
the part of it, that it adds (``peft``). No class is patched, so other instances are untouched.
While attached, the PEFT parameters appear in ``vit.state_dict()`` under names containing
``.peft.`` (so a hash of the adapted ViT covers them); :func:`detach` puts every ``base`` back,
after which the instance has exactly its original modules, parameters and state-dict keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from torch import nn


class Injected(nn.Module):
    """A wrapper put in place of one submodule (``base``) of a ViT; it adds ``peft``.

    Attributes it lacks are read from ``base``, so code that reads, e.g., ``vit.blocks[0].attn``
    keeps working while the block is wrapped.
    """

    def __init__(self, base: nn.Module, peft: nn.Module):
        super().__init__()
        self.base = base
        self.peft = peft

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None:
                raise
            return getattr(base, name)


class Injectable(Protocol):
    """A PEFT module that can wrap itself into a ViT (what :func:`injected` needs)."""

    def inject(self, vit: nn.Module) -> None: ...

    def modules(self) -> Iterator[nn.Module]: ...


def check_vit(vit: nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(vit).__name__}")


def unwrap(module: nn.Module) -> nn.Module:
    """The original submodule under any wrappers."""
    while isinstance(module, Injected):
        module = module.base
    return module


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every parameter frozen, in eval mode: the trunk that a
    method prompts or injects into, leaving the backbone it was given untouched."""
    import copy

    return copy.deepcopy(model).requires_grad_(False).eval()


def without_trunk(net: nn.Module, trunk: str = "vit") -> dict:
    """``net.state_dict()`` without the frozen copy held as submodule ``trunk``: the learned
    state of a prompted network (the copy is rebuilt from the backbone, never stored)."""
    return {k: v for k, v in net.state_dict().items() if not k.startswith(f"{trunk}.")}


def load_without_trunk(net: nn.Module, state: dict, trunk: str = "vit") -> None:
    """Load a ``without_trunk`` state into a freshly built ``net``: only the frozen copy's keys
    may be missing, and no key may be left over (a mismatch is an error, not ignored)."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    wrong = [k for k in missing if not k.startswith(f"{trunk}.")] + list(unexpected)
    if wrong:
        raise KeyError(f"the state does not fit {type(net).__name__}: missing or unexpected "
                       f"{wrong[:5]}{' ...' if len(wrong) > 5 else ''}")


def factory_kwargs(vit: nn.Module) -> dict:
    """Device and dtype of the ViT's weights, for new PEFT parameters."""
    p = next(vit.parameters())
    return {"device": p.device, "dtype": p.dtype}


def wrap(vit: nn.Module, path: str, make: Callable[[nn.Module], Injected], *,
         outermost: bool = False) -> Injected:
    """Replace the submodule at ``path`` (dotted, as in the plain ViT) by ``make(submodule)``.

    Wrappers already at ``path`` are kept: the new one goes directly around the original
    submodule, or around all of them when ``outermost``. A second wrapper of the same kind at one
    place is refused. The wrapper and its ``peft`` take the train/eval mode of the submodule.
    """
    *head, name = path.split(".")
    parent = vit
    for part in head:
        parent = unwrap(getattr(parent, part))
    chain = [(parent, name)]  # from the outermost wrapper down to the original submodule
    while isinstance(getattr(*chain[-1]), Injected):
        chain.append((getattr(*chain[-1]), "base"))
    parent, name = chain[0] if outermost else chain[-1]
    original = getattr(parent, name)
    wrapper = make(original)
    if type(wrapper) in {type(getattr(*link)) for link in chain}:
        raise ValueError(f"{path} already carries a {type(wrapper).__name__}; detach it first")
    wrapper.training = original.training  # the new modules follow the mode of the ViT
    wrapper.peft.train(original.training)
    setattr(parent, name, wrapper)
    return wrapper


def detach(vit: nn.Module, module: nn.Module) -> None:
    """Remove from ``vit`` every wrapper that injects ``module`` (or a part of it)."""
    owned = {id(m) for m in module.modules()}
    names = [name for name, m in vit.named_modules()
             if isinstance(m, Injected) and id(m.peft) in owned]
    if not names:
        raise ValueError(f"this {type(module).__name__} is not attached to this ViT")
    for name in sorted(names, key=lambda n: n.count("."), reverse=True):  # deepest first
        *head, leaf = name.split(".")
        parent = vit.get_submodule(".".join(head))
        setattr(parent, leaf, getattr(parent, leaf).base)


@contextmanager
def injected(vit: nn.Module, module: Injectable) -> Iterator[Injectable]:
    """``module`` attached to ``vit`` for the ``with`` block only (e.g. EASE runs one frozen
    trunk with each task's adapter set in turn)."""
    module.inject(vit)
    try:
        yield module
    finally:
        detach(vit, module)
