"""DyTox's task-attention block (TAB): a class-attention block where only the task token queries.

Douillard et al., "DyTox: Transformers for Continual Learning with DYnamic TOken eXpansion",
CVPR 2022, Eq. 2-3; official ``continual/convit.py`` (``ClassAttention`` inside ``Block``), after
CaiT's class attention (Touvron et al., ICCV 2021). With Z = [θ; X] (the task token, then the
patch tokens of the shared encoder):

    q = W_q LN(Z)[0],  K = W_k LN(Z),  V = W_v LN(Z),  A = softmax(q Kᵀ / √d_h)  (per head)
    θ ← θ + W_o (A V),  θ ← θ + MLP(LN(θ))

Only the token is updated and returned: the patch tokens are read, never written, so the shared
encoder output is the same for every task token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn


class TaskAttention(nn.Module):
    """Multi-head attention whose single query is the task token (no qkv bias, as DyTox)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, 1+N, D), token first -> the token's attention output (B, 1, D)."""
        b, n, d = z.shape
        h = self.num_heads
        q = self.q(z[:, :1]).view(b, 1, h, d // h).transpose(1, 2)  # (B, h, 1, d_h)
        k = self.k(z).view(b, n, h, d // h).transpose(1, 2)  # (B, h, 1+N, d_h)
        v = self.v(z).view(b, n, h, d // h).transpose(1, 2)  # (B, h, 1+N, d_h)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, 1, d_h)
        return self.proj(out.transpose(1, 2).reshape(b, 1, d))  # (B, 1, D)


class TaskAttentionBlock(nn.Module):
    """The TAB: pre-norm task attention and MLP, both residual on the task token only. LayerNorm
    eps 1e-5: DyTox and ESN build ConViT's ``Block`` with ``norm_layer=nn.LayerNorm`` (PyTorch's
    default eps; ``continual/convit.py``, ``continual/dytox.py``); ESN adds qkv bias and MLP
    ratio 0.5."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop_path: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = TaskAttention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.apply(_init_weights)

    def forward(self, token: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """token (B, 1, D), patches (B, N, D) -> the updated token (B, 1, D)."""
        z = self.norm1(torch.cat([token, patches], dim=1))  # (B, 1+N, D)
        token = token + self.drop_path(self.attn(z))  # (B, 1, D)
        return token + self.drop_path(self.mlp(self.norm2(token)))  # (B, 1, D)


def _init_weights(m: nn.Module) -> None:
    """DyTox/ConViT initialisation: trunc-normal(0.02) linear weights, zero biases."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
