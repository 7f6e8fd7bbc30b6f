"""PromptFusion's pieces (Chen et al., ECCV 2024; official HaoranChen/PromptFusion ``model.py``,
``prompt.py``, ``train_pf.py``): CoOp class-specific text prompts, the prompted CLIP image
feature (mean of the prompt outputs before CLIP's final norm), the fused logits and the
old/new re-weighting of the log-probabilities.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .prompts import block_inputs, insert_tokens, num_prefix_tokens


def prompt_texts(class_names: Sequence[str], context_length: int) -> list[str]:
    """The official ``clip_text_prompt_genarator`` strings: 2·M "X" placeholders, the class
    name ('_' -> ' ') and a full stop; the first M placeholders are replaced by learned vectors,
    the other M stay (as the official code)."""
    return [" ".join(["X"] * (2 * context_length)) + " " + n.replace("_", " ") + "."
            for n in class_names]


def embed_with_context(token_embedding: nn.Embedding, tokens: torch.Tensor,
                       context: torch.Tensor) -> torch.Tensor:
    """CoOp: tokens (n, L) and context vectors (n, M, W) -> (n, L, W) token embeddings with
    positions 1..M (after SOS) replaced by the context vectors."""
    with torch.no_grad():
        emb = token_embedding(tokens).float()  # (n, L, W)
    m = context.shape[1]
    return torch.cat([emb[:, :1], context.to(emb.dtype), emb[:, 1 + m:]], dim=1)  # (n, L, W)


@contextmanager
def prompt_pooling(vit: nn.Module, prompt: torch.Tensor) -> Iterator[None]:
    """Within the block, ``vit(x)`` is the official prompted CLIP image feature: ``prompt``
    (B, P, D) enters after the class token at block 0 (after ``norm_pre``, no positional
    embedding), and the mean of the P prompt outputs, not the class token, goes through the
    final norm (CLIP's ln_post) and the head (CLIP's projection): (B, E)."""
    at, n = num_prefix_tokens(vit), prompt.shape[1]

    def pool(module, args):
        return (args[0][:, at:at + n].mean(1, keepdim=True),)  # (B, 1, D) -> final norm

    handle = vit.norm.register_forward_pre_hook(pool)
    try:
        with block_inputs(vit, {0: lambda seq: insert_tokens(seq, prompt, at)}):
            yield
    finally:
        handle.remove()


def fuse(z_clip: torch.Tensor, z_vit: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(1 − σ(λ))·z_clip + σ(λ)·z_vit: (B, C), (B, C), (1,) -> (B, C)."""
    s = torch.sigmoid(lam)
    return (1 - s) * z_clip + s * z_vit  # (B, C)


def reweight(log_probs: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
             theta: float) -> torch.Tensor:
    """``generate_weight_mask``: log-probabilities (B, C_old + C_new) times
    [θ/σ(β) | σ(α)] row by row; alpha (≥B, C_new), beta (≥B, C_old), the first B rows used
    (the official batches are full: ``drop_last``)."""
    b = len(log_probs)
    weight = torch.cat([theta / torch.sigmoid(beta[:b]), torch.sigmoid(alpha[:b])], 1)  # (B, C)
    return log_probs * weight  # (B, C)
