"""CoOp text prompts with one generic context per domain (Zhou et al., "Learning to Prompt for
Vision-Language Models", IJCV 2022), as S-liPrompts uses them (official iamwangyabin/S-Prompts
``models/clip/prompt_learner.py``: ``NCTX`` 16, ``CSC`` False, ``CTXINIT`` '', class token at the
``end``).

The text of class c is "X X … X <name>." with M placeholders; their token embeddings are replaced
by M learned context vectors shared by all classes, and CLIP's frozen text tower encodes the
result (EOT pooling): f_txt(c; ctx) = T([SOS, ctx_1..M, name_c, ".", EOT]).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .promptfusion import embed_with_context


def coop_texts(class_names: Sequence[str], length: int) -> list[str]:
    """The official prompt strings: M "X" placeholders, the name ('_' -> ' ') and a full stop."""
    prefix = " ".join(["X"] * length)
    return [f"{prefix} {n.replace('_', ' ')}." for n in class_names]


def context_text_features(text: nn.Module, tokens: torch.Tensor,
                          context: torch.Tensor) -> torch.Tensor:
    """Tokens (C, L) of :func:`coop_texts` and one context (M, W) shared by the classes ->
    (C, E) text embeddings (not normalised)."""
    shared = context.expand(len(tokens), -1, -1)  # (C, M, W)
    emb = embed_with_context(text.token_embedding, tokens, shared)  # (C, L, W)
    return text.encode_embedded(emb, tokens.argmax(-1))  # (C, E)


class DomainContexts(nn.Module):
    """A frozen CLIP text tower and one CoOp context (M, W) per domain; the newest one trains.

    ``tokens`` (C, L) holds the prompts of every class seen so far (label order); domain s uses
    the first C_s of them.
    """

    def __init__(self, text: nn.Module, length: int):
        super().__init__()
        self.text, self.length = text, length
        self.contexts = nn.ParameterList()  # ctx_s (M, W) each
        self.register_buffer("tokens", torch.zeros(0, text.context_length, dtype=torch.long))

    def set_classes(self, class_names: Sequence[str]) -> None:
        """Tokenise the prompts of the classes seen so far (the label order of ``class_names``)."""
        tokens = self.text.tokenize(coop_texts(class_names, self.length))  # (C, L)
        if (tokens[:, -1] != 0).any():  # truncated: the class name (or more) was cut off
            raise ConfigError(f"sprompts: {self.length} text context vectors leave no room for "
                              f"the class name in {self.text.context_length} text tokens; lower "
                              f"text_context")
        self.tokens = tokens.to(self.tokens.device)

    def add(self, generator: torch.Generator | None = None) -> None:
        """A new trainable context, N(0, 0.02²) as the official ``nn.init.normal_(std=0.02)``;
        the earlier ones are frozen."""
        for p in self.contexts:
            p.requires_grad_(False)
        width = self.text.token_embedding.embedding_dim
        ctx = 0.02 * torch.randn(self.length, width, generator=generator)  # (M, W)
        self.contexts.append(nn.Parameter(ctx.to(self.tokens.device)))

    def features(self, s: int, num_classes: int) -> torch.Tensor:
        """(C_s, E) unit-norm text features of the first C_s classes with context s."""
        feats = context_text_features(self.text, self.tokens[:num_classes], self.contexts[s])
        return F.normalize(feats, dim=-1)  # (C_s, E)
