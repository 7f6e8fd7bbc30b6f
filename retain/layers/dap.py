"""DAP's instance-level prompt generator (Jung et al., "Generating Instance-level Prompts for
Rehearsal-free Continual Learning", ICCV 2023; naver-ai/dap-cl ``src/models/vit_dap/vit.py``
``ADPT_Block``, Mammoth ``models/dap_utils/dap_model.py``).

In every prompted block the sequence ``x`` (B, N, D) entering the block (without the previous
block's DAP tokens) makes K new tokens:

    m  = W · LN(x) + b                       token mixing over the sequence: (B, N, D) -> (B, K, D)
    [γ; β] = F · e + c                        FiLM from the task embedding e (B, E): γ, β ∈ R^D
    p  = γ/‖γ‖ ⊙ m + β/‖β‖                   (the norms are detached: no gradient through them)

W (K, N) and b (K,) start at zero, so the first tokens are β/‖β‖. The K tokens enter the sequence
after the class (and register) tokens; the next prompted block first removes them and generates
its own, so the sequence keeps length N + K inside the prompted blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .prompts import insert_tokens, remove_tokens


class PromptGenerator(nn.Module):
    """One block's generator: (sequence (B, N, D), task embedding (B, E)) -> (B, K, D)."""

    def __init__(self, seq_len: int, num_tokens: int, dim: int, task_dim: int, *,
                 eps: float = 1e-6, generator: torch.Generator | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mixer = nn.Linear(seq_len, num_tokens)  # token mixing N -> K, zero-initialised
        self.film = nn.Linear(task_dim, 2 * dim)
        with torch.no_grad():
            self.mixer.weight.zero_()
            self.mixer.bias.zero_()
            bound = task_dim ** -0.5  # nn.Linear's default bounds, drawn from ``generator``
            self.film.weight.uniform_(-bound, bound, generator=generator)
            self.film.bias.uniform_(-bound, bound, generator=generator)

    @property
    def seq_len(self) -> int:
        return self.mixer.in_features

    def forward(self, seq: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if seq.shape[1] != self.seq_len:
            raise ValueError(f"the DAP token mixer expects {self.seq_len} tokens, got "
                             f"{seq.shape[1]} (use the image size the ViT was built for)")
        mixed = self.mixer(self.norm(seq).transpose(1, 2))  # (B, D, K)
        gamma, beta = self.film(emb).chunk(2, dim=1)  # (B, D) each
        gamma = gamma / gamma.norm(dim=1, keepdim=True).detach()  # (B, D)
        beta = beta / beta.norm(dim=1, keepdim=True).detach()  # (B, D)
        return (gamma[:, :, None] * mixed + beta[:, :, None]).transpose(1, 2)  # (B, K, D)


class DAPGenerators(nn.Module):
    """The generators of the prompted ``blocks`` of one ViT, and the sequence edits they make.

    ``edits(emb, at)`` gives, for :func:`retain.layers.prompts.block_inputs`, the function of
    each block: drop the previous block's tokens (if it added some), then add this block's (if
    it is prompted). ``ends_with_tokens``: the last of the ``depth`` blocks adds K DAP tokens,
    which its output still holds.
    """

    def __init__(self, depth: int, blocks: Sequence[int], seq_len: int, num_tokens: int,
                 dim: int, task_dim: int, *, generator: torch.Generator | None = None):
        super().__init__()
        self.blocks = tuple(sorted(set(blocks)))
        if not self.blocks or not 0 <= self.blocks[0] <= self.blocks[-1] < depth:
            raise ValueError(f"DAP blocks {blocks} must be non-empty, in 0..{depth - 1}")
        self.depth = depth
        self.num_tokens = num_tokens
        self.generators = nn.ModuleList(
            PromptGenerator(seq_len, num_tokens, dim, task_dim, generator=generator)
            for _ in self.blocks)

    def generator_of(self, block: int) -> PromptGenerator:
        return self.generators[self.blocks.index(block)]

    @property
    def ends_with_tokens(self) -> bool:
        return self.depth - 1 in self.blocks

    def edits(self, emb: torch.Tensor, at: int
              ) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
        """{block: sequence -> sequence} for task embeddings ``emb`` (B, E), tokens at ``at``."""
        touched = (set(self.blocks) | {b + 1 for b in self.blocks}) & set(range(self.depth))
        return {b: self._edit(b, emb, at) for b in sorted(touched)}

    def _edit(self, block: int, emb: torch.Tensor, at: int
              ) -> Callable[[torch.Tensor], torch.Tensor]:
        def edit(seq: torch.Tensor) -> torch.Tensor:  # (B, N[+K], D) -> (B, N[+K], D)
            if block - 1 in self.blocks:
                seq = remove_tokens(seq, at, self.num_tokens)  # (B, N, D)
            if block in self.blocks:
                seq = insert_tokens(seq, self.generator_of(block)(seq, emb), at)  # (B, N+K, D)
            return seq

        return edit
