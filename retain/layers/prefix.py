"""Prefix tuning (Li & Liang, ACL 2021) in timm's attention, as used by DualPrompt (Wang et al.,
ECCV 2022), CODA-Prompt (Smith et al., CVPR 2023), HiDe-Prompt (Wang et al., NeurIPS 2023) and
LAE (Gao et al., ICCV 2023).

In a prefixed block, per head: ``K' = [P_K ; K]``, ``V' = [P_V ; V]``; the queries, and so the
sequence length, are unchanged. A prefix is a tensor (B, 2, L, D): key and value prefixes for each
sample, split into heads like K and V; they join the keys after timm's ``k_norm``.

``attach_prefix(vit, blocks, length)`` wraps the attention of ``blocks`` and returns a learned
prefix shared by all samples (:class:`PrefixPrompts`; ``length=0`` gives none, and the ViT then
computes exactly what it did before). Methods that pick a prompt per sample (DualPrompt, CODA,
HiDe) pass their prefixes for one call with :func:`forward_with_prefix` (or the
:func:`supplied_prefixes` context); nothing is stored on the modules between calls.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .inject import Injected, check_vit, factory_kwargs, unwrap, wrap


class PrefixPrompts(nn.Module):
    """Learned prefixes ``prompts`` (K, 2, L, D) for the K blocks ``blocks``, shared by all
    samples (DualPrompt's G-prompt: blocks 0-1, L=5, 15,360 on ViT-B; LAE: blocks 0-4, L=10,
    76,800)."""

    def __init__(self, blocks: Sequence[int], length: int, dim: int, *, device=None, dtype=None):
        super().__init__()
        self.blocks = tuple(blocks)
        self.prompts = nn.Parameter(torch.zeros(len(self.blocks), 2, length, dim, device=device,
                                                dtype=dtype))  # (K, 2, L, D)

    @property
    def length(self) -> int:
        return self.prompts.shape[2]

    def prefix(self, slot: int) -> torch.Tensor:
        """(2, L, D): the learned key and value prefix of the ``slot``-th block."""
        return self.prompts[slot]

    def prefixes(self, batch_size: int) -> dict[int, torch.Tensor]:
        """{block: (B, 2, L, D)}: the learned prefixes, for :func:`forward_with_prefix`."""
        return {b: self.prefix(i).expand(batch_size, -1, -1, -1)
                for i, b in enumerate(self.blocks)}

    def inject(self, vit: nn.Module) -> None:
        check_vit(vit)
        if not all(0 <= b < len(vit.blocks) for b in self.blocks):
            raise ValueError(f"blocks {self.blocks} for a ViT of {len(vit.blocks)} blocks")
        for slot, block in enumerate(self.blocks):
            wrap(vit, f"blocks.{block}.attn",
                 lambda attn, slot=slot, block=block: self.attention(attn, slot, block))

    def attention(self, attn: nn.Module, slot: int, block: int) -> nn.Module:
        """The attention that replaces block ``block``'s (subclasses change the kind)."""
        return PrefixAttention(attn, self, slot, block)


class PrefixAttention(Injected):
    """timm ``Attention`` that takes a ``prefix`` (B, 2, L, D) keyword; without one it uses the
    learned prefix of its block, or, if that is empty, runs the original attention."""

    def __init__(self, base: nn.Module, peft: PrefixPrompts, slot: int, block: int):
        from timm.layers import Attention

        if not isinstance(base, Attention):
            raise TypeError(f"block {block}: prefixes need timm's Attention, got "
                            f"{type(base).__name__}")
        super().__init__(base, peft)
        self.slot = slot
        self.block = block

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, prefix: torch.Tensor | None = None) -> torch.Tensor:
        if prefix is None and self.peft.length > 0:
            prefix = self.peft.prefix(self.slot).expand(x.shape[0], -1, -1, -1)  # (B, 2, L, D)
        if prefix is None:
            return self.base(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("prefix attention takes no attention mask")
        return prefix_attention(self.base, x, prefix)


def prefix_attention(attn: nn.Module, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """timm ``Attention.forward`` (q/k norm, attention and projection dropout, output norm and
    gate) with ``K' = [P_K ; K]``, ``V' = [P_V ; V]``; x (B, N, D), prefix (B, 2, L, D)."""
    B, N, _ = x.shape
    H, hd, L = attn.num_heads, attn.head_dim, prefix.shape[2]
    if prefix.shape != (B, 2, L, H * hd):
        raise ValueError(f"prefix must be (B={B}, 2, L, {H * hd}), got {tuple(prefix.shape)}")
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None  # (B, N, D)
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    p = prefix.to(q.dtype).reshape(B, 2, L, H, hd).permute(1, 0, 3, 2, 4)  # (2, B, H, L, hd)
    pk, pv = p.unbind(0)  # (B, H, L, hd)
    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, H, L+N, hd)
    drop = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # (B, H, N, hd)
    out = out.transpose(1, 2).reshape(B, N, H * hd)  # (B, N, D)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))  # (B, N, D)


@contextmanager
def supplied_prefixes(vit: nn.Module, prefixes: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Within the ``with`` block, block ``b`` attends over ``prefixes[b]`` (B, 2, L, D) instead of
    its learned prefix. Forward pre-hooks hand each prefix to its attention as a keyword argument
    and are removed on exit."""
    sites = {m.block: m for m in vit.modules() if isinstance(m, PrefixAttention)}
    missing = sorted(set(prefixes) - set(sites))
    if missing:
        raise ValueError(f"blocks {missing} have no PrefixAttention; "
                         "attach_prefix(vit, blocks) first")
    handles = [sites[b].register_forward_pre_hook(_supply(p), with_kwargs=True)
               for b, p in prefixes.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _supply(prefix: torch.Tensor):
    def hook(module, args, kwargs):
        return args, {**kwargs, "prefix": prefix}

    return hook


def forward_with_prefix(vit: nn.Module, x: torch.Tensor,
                        prefixes: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """``vit(x)`` with the per-sample prefixes ``{block: (B, 2, L, D)}`` for this call only."""
    with supplied_prefixes(vit, prefixes):
        return vit(x)


def attach_prefix(vit: nn.Module, blocks: Sequence[int] = (0, 1, 2, 3, 4), length: int = 0, *,
                  init: tuple[float, float] = (-1.0, 1.0),
                  generator: torch.Generator | None = None) -> PrefixPrompts:
    """Wrap the attention of ``blocks`` in place; return their learned prefix (``length`` tokens,
    ``U(*init)``: DualPrompt's (-1, 1), LAE's (0, 0.01))."""
    check_vit(vit)
    attn = unwrap(unwrap(vit.blocks[0]).attn)
    prompts = PrefixPrompts(blocks, length, attn.num_heads * attn.head_dim, **factory_kwargs(vit))
    nn.init.uniform_(prompts.prompts, *init, generator=generator)
    prompts.inject(vit)
    return prompts
