"""One frozen timm ViT under several AdaptFormer adapter sets in one call (EASE's subspaces;
Zhou et al., CVPR 2024).

EASE keeps one :class:`~retain.layers.adapter.AdapterSet` per task on one frozen trunk; a test
image needs its feature in every subspace. LAMDA-PILOT (``backbone/vit_ease.py::forward_test``)
runs t+1 full forward passes, one per adapter set, each starting again from the embedding.
:func:`multi_adapter_forward` runs the trunk once over the batch replicated across the T sets:

* **shared** (computed once for the B images): the patch embedding, class/register tokens and
  position embedding, and in the first block the attention residual and the MLP branch, since
  the first block's input is the same for every adapter set (the adapter reads the attention
  residual and is added beside the MLP, so only its own small branch differs);
* **not shared**: from the first block's output on, each set's adapter has changed the residual
  stream, so the attention and the MLP of blocks 2..L see T different inputs and run on the
  (T·B) batch. Their FLOPs are those of T separate passes; what the batching saves there is
  T-1 reads of every block's weights and T-1 kernel launches per layer (one large batch).

Per image: T·L block evaluations become 1 + T·(L-1), i.e. about 1/L of the trunk (8 % on
ViT-B/16) is saved for every set after the first. Each set's adapters run on their own (B, N, D)
slice. The block equation is that of ``retain.layers.adapter`` (AdaptFormer, parallel, PILOT):
out = h + ls2(mlp(norm2(h))) + adapter(h), with h = x + ls1(attn(norm1(x))).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .adapter import AdapterSet
from .inject import check_vit


def multi_adapter_forward(vit: nn.Module, adapter_sets: Sequence[AdapterSet], x: torch.Tensor
                          ) -> torch.Tensor:
    """(B, 3, S, S) -> (B, T, D): ``vit``'s pre-logits feature under each of the T adapter sets.

    ``vit`` must carry no injected module (its blocks are timm's plain ``Block``); the sets are
    used as they are (train/eval mode, dropout), not attached.
    """
    _check(vit, adapter_sets)
    t, b = len(adapter_sets), x.shape[0]
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))  # (B, N, D) shared
    for depth, block in enumerate(vit.blocks):
        adapters = [s.adapters[depth] for s in adapter_sets]
        h = _block(block, adapters, h, shared_input=depth == 0)  # (T·B, N, D)
    feats = vit.forward_head(vit.norm(h), pre_logits=True)  # (T·B, D)
    return feats.view(t, b, -1).transpose(0, 1)  # (B, T, D)


def _block(block: nn.Module, adapters: list[nn.Module], x: torch.Tensor, shared_input: bool
           ) -> torch.Tensor:
    """One block for T adapters; ``x`` is (B, N, D) when every set has the same input, else
    (T·B, N, D) with set j's slice at rows [j·B, (j+1)·B)."""
    h = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))  # (B or T·B, N, D)
    out = h + block.drop_path2(block.ls2(block.mlp(block.norm2(h))))  # (B or T·B, N, D)
    slices = [h] * len(adapters) if shared_input else h.chunk(len(adapters))
    branch = torch.cat([a(s) for a, s in zip(adapters, slices, strict=True)])  # (T·B, N, D)
    return (out.repeat(len(adapters), 1, 1) if shared_input else out) + branch


def _check(vit: nn.Module, adapter_sets: Sequence[AdapterSet]) -> None:
    from timm.models.vision_transformer import Block

    check_vit(vit)
    if not adapter_sets:
        raise ValueError("multi_adapter_forward needs at least one adapter set")
    odd = [type(b).__name__ for b in vit.blocks if type(b) is not Block]
    if odd:
        raise TypeError(f"the trunk's blocks must be plain timm Blocks (nothing injected); "
                        f"found {sorted(set(odd))}")
    for s in adapter_sets:
        if len(s.adapters) != len(vit.blocks):
            raise ValueError(f"{len(s.adapters)} adapters for {len(vit.blocks)} blocks")


class MultiAdapterViT(nn.Module):
    """(B, 3, S, S) -> (B, T, D): a frozen trunk seen through T adapter sets (shared modules,
    nothing copied); ``flatten`` gives (B, T·D) instead, e.g. for one set as a ``Backbone``."""

    def __init__(self, vit: nn.Module, adapter_sets: Sequence[AdapterSet], flatten: bool = False):
        super().__init__()
        self.vit = vit
        self.adapter_sets = nn.ModuleList(adapter_sets)
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = multi_adapter_forward(self.vit, list(self.adapter_sets), x)  # (B, T, D)
        return feats.flatten(1) if self.flatten else feats
