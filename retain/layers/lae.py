"""The parameter-efficient modules of LAE (Gao et al., "A Unified Continual Learning Framework with
General Parameter-Efficient Tuning", ICCV 2023; official code gqk/LAE ``libml/model/pet/*.py``,
``libml/model/backbone/vit.py``; LAMDA-PILOT ``backbone/vit_lae.py``), and LAE's two operations
on them: the EMA accumulation of an offline copy and the max-of-softmax ensemble.

* **Compensatory prefix** (:class:`CompensatedPrefix`): prefix tuning (``K' = [P_K ; K]``,
  ``V' = [P_V ; V]``, :mod:`retain.layers.prefix`) where, after the softmax, the attention on the
  L prefix slots is divided by its own mass λ = Σ_{j∈prefix} a_j (official ``Prefix.compensate``).
  Per query the output is then ``(1 − λ)·Attn(q, K, V) + Attn(q, P_K, P_V)``: the prefix branch
  is not scaled down by λ. The key and the value prefix of each block are each multiplied by a
  learned scalar, 1 at the start (official ``Scaler(None)``; the adapter's output and each LoRA
  update have one too). The slot position (after CLS in the official code, first here) does not
  matter: attention is invariant to the order of its keys.
* **Attention adapter** (:class:`AttentionAdapterSet`, official ``Adapter`` with
  ``mode="parallel"``, ``down_sample=5``): ``x + attn(n1(x)) + s·up(GELU(down(n1(x))))`` in the
  chosen blocks, ``n1`` = the block's first LayerNorm; ``down`` Kaiming-uniform (a=√5), ``up`` and
  both biases zero, no scaling or dropout. (``retain.layers.adapter`` is AdaptFormer's adapter,
  parallel to the MLP of every block with ReLU, scale 0.1 and dropout: another module.)
* **KV-LoRA** (:class:`KVLoRASet`, official ``KVLoRA``, rank 5): the qkv projection of the chosen
  blocks gets ``ΔW_k = B_k A_k`` and ``ΔW_v = B_v A_v`` (q untouched); A Kaiming-uniform, B zero.

Each set is an ``Injectable``: ``with injected(vit, pet): vit(x)`` runs a frozen trunk with it,
so an online and an offline copy can share one trunk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .inject import Injected, check_vit, factory_kwargs, unwrap, wrap
from .prefix import PrefixAttention, PrefixPrompts, prefix_attention


# -- compensatory prefix --------------------------------------------------------------------------
def compensated_prefix_attention(attn: nn.Module, x: torch.Tensor, prefix: torch.Tensor
                                 ) -> torch.Tensor:
    """timm ``Attention`` over ``[P_K ; K]``/``[P_V ; V]`` with the prefix slots' attention
    divided by its mass (official ``Prefix.compensate``); x (B, N, D), prefix (B, 2, L, D)."""
    B, N, _ = x.shape
    H, hd, L = attn.num_heads, attn.head_dim, prefix.shape[2]
    if prefix.shape != (B, 2, L, H * hd):
        raise ValueError(f"prefix must be (B={B}, 2, L, {H * hd}), got {tuple(prefix.shape)}")
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    pk, pv = prefix.to(q.dtype).reshape(B, 2, L, H, hd).permute(1, 0, 3, 2, 4).unbind(0)
    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, H, L+N, hd)
    a = (q * attn.scale @ k.transpose(-2, -1)).softmax(-1)  # (B, H, N, L+N)
    a = attn.attn_drop(a)
    a = compensate(a, L)  # (B, H, N, L+N)
    out = (a @ v).transpose(1, 2).reshape(B, N, H * hd)  # (B, N, D)
    out = getattr(attn, "norm", nn.Identity())(out)
    return attn.proj_drop(attn.proj(out))  # (B, N, D)


def compensate(a: torch.Tensor, length: int) -> torch.Tensor:
    """Attention probabilities (..., L+N) with the first ``length`` (prefix) slots renormalised
    to sum to one: a_j / Σ_{i<L} a_i for j < L; the other slots unchanged."""
    pre, rest = a[..., :length], a[..., length:]
    return torch.cat([pre / pre.sum(-1, keepdim=True).clamp(min=1e-12), rest], dim=-1)


class CompensatedPrefixAttention(PrefixAttention):
    """:class:`~retain.layers.prefix.PrefixAttention` over the scaled prefix of its block, with
    the compensated attention (or plain prefix attention when ``peft.compensatory`` is off)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, prefix: torch.Tensor | None = None) -> torch.Tensor:
        if prefix is None:
            prefix = self.peft.prefix(self.slot).expand(x.shape[0], -1, -1, -1)  # (B, 2, L, D)
        if attn_mask is not None or is_causal or getattr(self.base, "gate", None) is not None:
            raise ValueError("LAE prefix attention takes no mask or gate")
        if self.peft.compensatory:
            return compensated_prefix_attention(self.base, x, prefix)
        return prefix_attention(self.base, x, prefix)


class CompensatedPrefix(PrefixPrompts):
    """LAE's prefix: prompts (K, 2, L, D) for ``blocks``, U(0, 0.01), each key and value prefix
    times a learned scalar ``scales`` (K, 2), 1 at the start (official ``Prompt`` with
    ``Scaler(None)``); ``compensatory=False`` gives plain prefix tuning."""

    def __init__(self, blocks: Sequence[int], length: int, dim: int, *, compensatory: bool = True,
                 device=None, dtype=None):
        if length < 1:
            raise ValueError("an LAE prefix needs length >= 1")
        super().__init__(blocks, length, dim, device=device, dtype=dtype)
        self.scales = nn.Parameter(torch.ones(len(self.blocks), 2, device=device, dtype=dtype))
        self.compensatory = compensatory

    def prefix(self, slot: int) -> torch.Tensor:
        """(2, L, D): the scaled key and value prefix of the ``slot``-th block."""
        return self.prompts[slot] * self.scales[slot].view(2, 1, 1)

    def attention(self, attn: nn.Module, slot: int, block: int) -> nn.Module:
        return CompensatedPrefixAttention(attn, self, slot, block)


def compensated_prefix(vit: nn.Module, blocks: Sequence[int], length: int = 10, *,
                       compensatory: bool = True, init: tuple[float, float] = (0.0, 0.01),
                       generator: torch.Generator | None = None) -> CompensatedPrefix:
    """A new (not yet attached) LAE prefix for ``blocks`` of ``vit``."""
    check_vit(vit)
    attn = unwrap(unwrap(vit.blocks[0]).attn)
    pet = CompensatedPrefix(blocks, length, attn.num_heads * attn.head_dim,
                            compensatory=compensatory, **factory_kwargs(vit))
    nn.init.uniform_(pet.prompts, *init, generator=generator)
    return pet


# -- adapter parallel to the attention -----------------------------------------------------------
class AttentionAdapterSet(nn.Module):
    """One bottleneck ``s·up(GELU(down(·)))`` per block of ``blocks``, parallel to attention,
    with a learned scalar s (1 at the start; official ``Scaler(None)``)."""

    def __init__(self, blocks: Sequence[int], dim: int, bottleneck: int = 5, *, device=None,
                 dtype=None):
        super().__init__()
        self.blocks = tuple(blocks)
        kw = {"device": device, "dtype": dtype}
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, bottleneck, **kw), nn.GELU(),
                          nn.Linear(bottleneck, dim, **kw), _Scale(**kw)) for _ in self.blocks)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for down, _, up, _ in self.adapters:
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5), generator=generator)
            for t in (down.bias, up.weight, up.bias):
                nn.init.zeros_(t)

    def inject(self, vit: nn.Module) -> None:
        check_vit(vit)
        for adapter, block in zip(self.adapters, self.blocks, strict=True):
            wrap(vit, f"blocks.{block}.attn", lambda attn, a=adapter: _ParallelBranch(attn, a))


class _Scale(nn.Module):
    """x · s with a learned scalar s, 1 at the start."""

    def __init__(self, device=None, dtype=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class _ParallelBranch(Injected):
    """``base(x) + peft(x)``: the adapter reads the attention's input (the normalised tokens)."""

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.base(x, **kwargs) + self.peft(x)  # (B, N, D)


# -- KV-LoRA ------------------------------------------------------------------------------------
class KVLoRASet(nn.Module):
    """Rank-r updates of the key and value rows of ``qkv`` in ``blocks``: A (K, 2, r, D),
    B (K, 2, D, r) and learned scalars s (K, 2), 1 at the start: ΔW_k = s_k·B_k A_k."""

    def __init__(self, blocks: Sequence[int], dim: int, rank: int = 5, *, device=None,
                 dtype=None):
        super().__init__()
        self.blocks = tuple(blocks)
        kw = {"device": device, "dtype": dtype}
        self.lora_a = nn.Parameter(torch.zeros(len(self.blocks), 2, rank, dim, **kw))
        self.lora_b = nn.Parameter(torch.zeros(len(self.blocks), 2, dim, rank, **kw))
        self.scales = nn.Parameter(torch.ones(len(self.blocks), 2, **kw))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for a in self.lora_a.view(-1, *self.lora_a.shape[2:]):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_b)

    def inject(self, vit: nn.Module) -> None:
        check_vit(vit)
        for slot, block in enumerate(self.blocks):
            wrap(vit, f"blocks.{block}.attn.qkv",
                 lambda qkv, slot=slot: _KVLoRALinear(qkv, self, slot))


class _KVLoRALinear(Injected):
    def __init__(self, base: nn.Module, peft: KVLoRASet, slot: int):
        super().__init__(base, peft)
        self.slot = slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.base(x).chunk(3, dim=-1)  # (B, N, D) each
        a, b = self.peft.lora_a[self.slot], self.peft.lora_b[self.slot]  # (2, r, D), (2, D, r)
        s = self.peft.scales[self.slot]  # (2,)
        k = k + s[0] * F.linear(F.linear(x, a[0]), b[0])  # (B, N, D)
        v = v + s[1] * F.linear(F.linear(x, a[1]), b[1])  # (B, N, D)
        return torch.cat([q, k, v], dim=-1)  # (B, N, 3D)


# -- LAE's accumulation and ensemble -------------------------------------------------------------
@torch.no_grad()
def ema_update_(offline: nn.Module, online: nn.Module, decay: float) -> None:
    """θ_off ← decay·θ_off + (1 − decay)·θ_on for every parameter, in place (timm
    ``ModelEmaV2.update``, as the official code calls after every optimizer step)."""
    for p_off, p_on in zip(offline.parameters(), online.parameters(), strict=True):
        p_off.mul_(decay).add_(p_on.detach(), alpha=1.0 - decay)


def max_softmax_fusion(*logits: torch.Tensor) -> torch.Tensor:
    """log max_m softmax(z_m): the official ensemble p = max(softmax(z_on), softmax(z_off)),
    element-wise, returned as log-probabilities (same argmax); each z (B, C)."""
    return torch.stack([z.log_softmax(-1) for z in logits]).amax(0)  # (B, C)
