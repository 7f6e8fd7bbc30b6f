"""Prompt pools with keys, and prompt tokens put into a timm ViT's sequence for one call.

Key-query matching is shared by L2P (Wang et al., CVPR 2022, §4.2), DualPrompt's E-prompts
(Wang et al., ECCV 2022, §4.2) and DAP's task keys (Jung et al., ICCV 2023): a query ``q`` (B, D)
(the frozen backbone's feature of the image) is compared with ``M`` learned keys by cosine
similarity, each sample takes its top-``k`` keys, and a surrogate "pull" term
``−(1/B) Σ_b Σ_{i∈sel(b)} cos(q_b, k_i)`` draws the chosen keys toward their queries.

Selection is per sample. The reference code's ``batchwise_prompt`` (the ``k`` indices chosen most
often over the batch are used for every sample of the batch) is available as ``batchwise=True``
only; combined with task-pure test batches it reads the task identity from the batch
(``shared/specs/protocol-pitfalls.md`` §1.1), so methods expose it as a labelled option.

:func:`block_inputs` lets a method edit the token sequence entering chosen blocks during one call
(insert prompt tokens after the class token, drop the previous layer's, ...): forward pre-hooks,
removed on exit; nothing is stored on the ViT between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .inject import check_vit, unwrap


class KeyedPool(nn.Module):
    """``size`` keys (M, D), ``U(*init)`` as L2P/DualPrompt (both U(-1, 1))."""

    def __init__(self, size: int, dim: int, *, init: tuple[float, float] = (-1.0, 1.0),
                 generator: torch.Generator | None = None):
        super().__init__()
        self.keys = nn.Parameter(torch.empty(size, dim).uniform_(*init, generator=generator))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        """(B, M) cosine similarity of each query (B, D) to each key."""
        return F.normalize(query, dim=1) @ F.normalize(self.keys, dim=1).T  # (B, M)


class PromptPool(KeyedPool):
    """L2P's pool: ``size`` prompts (M, L, D) and their keys (M, D), both ``U(*init)``."""

    def __init__(self, size: int, length: int, dim: int, *,
                 init: tuple[float, float] = (-1.0, 1.0),
                 generator: torch.Generator | None = None):
        super().__init__(size, dim, init=init, generator=generator)
        self.prompts = nn.Parameter(torch.empty(size, length, dim).uniform_(
            *init, generator=generator))  # (M, L, D)

    @property
    def length(self) -> int:
        return self.prompts.shape[1]

    def tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, k) indices -> (B, k·L, D): the chosen prompts, one after the other."""
        return self.prompts[idx].flatten(1, 2)  # (B, k·L, D)


def select(similarity: torch.Tensor, k: int, *, batchwise: bool = False,
           allowed: int | None = None) -> torch.Tensor:
    """(B, k) indices of the ``k`` best keys of each row of ``similarity`` (B, M).

    ``allowed``: only keys ``0..allowed-1`` compete (the keys of tasks learned so far).
    ``batchwise``: the ``k`` indices picked most often over the batch, for every sample (ties to
    the lower index), as L2P's ``batchwise_prompt``; uses batch information.
    """
    sim = similarity
    if allowed is not None:
        if not 0 < allowed <= sim.shape[1]:
            raise ValueError(f"allowed must be in 1..{sim.shape[1]}, got {allowed}")
        sim = sim[:, :allowed]
    if k > sim.shape[1]:
        raise ValueError(f"cannot select {k} of {sim.shape[1]} keys")
    idx = sim.topk(k, dim=1).indices  # (B, k)
    if not batchwise:
        return idx
    counts = torch.bincount(idx.flatten(), minlength=sim.shape[1]).float()  # (M,)
    order = torch.arange(sim.shape[1], device=sim.device, dtype=torch.float)
    top = (counts - order * 1e-6).topk(k).indices  # most frequent first, ties to the lower index
    return top.expand(len(idx), -1)  # (B, k)


def pull_loss(similarity: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """L2P's surrogate term ``(1/B) Σ_b Σ_{i∈idx[b]} cos(q_b, k_i)`` (to be *subtracted*, scaled
    by λ, from the loss); similarity (B, M), idx (B, k)."""
    return similarity.gather(1, idx).sum() / len(similarity)


# ---------------------------------------------------------------------------------- sequences

def insert_tokens(seq: torch.Tensor, tokens: torch.Tensor, at: int) -> torch.Tensor:
    """(B, N, D), (B, P, D) -> (B, N+P, D) with ``tokens`` at positions ``at..at+P-1``."""
    return torch.cat([seq[:, :at], tokens.to(seq.dtype), seq[:, at:]], dim=1)


def remove_tokens(seq: torch.Tensor, at: int, count: int) -> torch.Tensor:
    """(B, N+P, D) -> (B, N, D) without the ``count`` tokens from position ``at``."""
    return torch.cat([seq[:, :at], seq[:, at + count:]], dim=1)


def class_position(vit: nn.Module) -> torch.Tensor:
    """(1, 1, D) positional embedding of the class token (zeros where it has none): L2P gives
    each prompt token a copy of it."""
    pos = vit.pos_embed
    if pos is None or vit.cls_token is None or vit.no_embed_class:
        return next(vit.parameters()).new_zeros(1, 1, vit.embed_dim)
    return pos[:, :1]  # (1, 1, D)


@contextmanager
def block_inputs(vit: nn.Module, edits: Mapping[int, Callable[[torch.Tensor], torch.Tensor]]
                 ) -> Iterator[None]:
    """Within the ``with`` block, the sequence entering block ``b`` is ``edits[b](x)`` (B, N', D).

    The final norm sees whatever the last block returns; callers pool from
    ``vit.forward_features`` themselves when they add tokens.
    """
    check_vit(vit)
    bad = sorted(b for b in edits if not 0 <= b < len(vit.blocks))
    if bad:
        raise ValueError(f"blocks {bad} do not exist in a ViT of {len(vit.blocks)} blocks")
    handles = [vit.blocks[b].register_forward_pre_hook(_edit(fn), with_kwargs=True)
               for b, fn in edits.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _edit(fn: Callable[[torch.Tensor], torch.Tensor]):
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "x": fn(kwargs["x"])}

    return hook


def num_prefix_tokens(vit: nn.Module) -> int:
    """Class and register tokens at the front of the sequence (prompts go right after them)."""
    return unwrap(vit).num_prefix_tokens
