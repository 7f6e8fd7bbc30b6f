"""APG's pieces: the Adaptive Prompt Generator, its per-class extra tokens, the proxy classifier,
the attention loss, the centre library and the network ``APGNet`` (Tang et al., "When
Prompt-based Incremental Learning Does Not Meet Strong Pretraining", ICCV 2023; official code
TOM-tym/APG). Its warm-up + cosine schedule is ``retain.layers.schedules.warmup_cosine``.

Generator (``inclearn/backbones/Self_Prompts.py``: ``AdaptivePromptGenerator``, ``MyAttention``,
``Mlp``, ``ExtraTokens``). For a query token x (B, D) — the class token after the ViT's
intermediate block — and the extra tokens E (T, D), one per class seen so far:

    u = LN(MLP_in(x))                                   MLP(x) = drop(fc2(drop(GELU(fc1(x)))))
    q = W_q u,  K = W_k [u; E],  V = W_v [u; E]         per head h (dh = D / H)
    s_h = (q_h · s) K_hᵀ,  s = dh^-½                    raw attention logits (B, H, 1+T)
    a_h = softmax(s_h) · s                              (the reference multiplies by s again)
    p = MLP_out(W_o [a_1 V_1; …; a_H V_H] (+ u if residual))      the prompt (B, 1, D)

The MLPs have no identity path: ``Mlp.forward`` adds its input back (``x += res``) in the first
partial release (commit 1b358ce) only; the full release that adds the pre-trained setting
(2c480e3, still the head e928012), the code behind the paper's pre-trained results, comments it
out. (With the residual, u ≈ LN(x) and p ≈ out + MLP(out): the initial prompt's L1 norm is ~7×
the official one, which the norm and centre constraints then act on.) The only residual is the
attention's optional ``+ u`` (``APG_residual``, false in the pre-trained configs).

The raw logits ``s`` feed the attention loss (``attn_type: KLDivTripletWithHardCe``,
``inclearn/lib/deit_engine.py``): with the first column (u itself) dropped, every head's row
over the T extra tokens is a classifier of the sample's class (hard CE, τ = 1) plus a soft
triplet loss whose distance is the KL divergence between rows (``SoftTripletLossWithKLDiv``,
``inclearn/lib/losses/base.py``).

Extra tokens are added per task (``ExtraTokens.add_tokens``): the first task's ~ N(0, 0.02²),
later ones ~ U(0, 1); a task's block is frozen from the next task on (``frozen_old_prompt``).
Linear layers are initialised as timm's ``_init_vit_weights`` (truncated normal, std 0.02, zero
bias). The proxy head is ``TransClassifiers`` with ``proxy_per_class`` K
(``inclearn/lib/network/trans_classifiers.py``): z_ck = w_ckᵀf + b_ck,
z_c = Σ_k softmax_k(z_c·)·z_ck.

The centre library (``build_center_library``, ``inclearn/models/continual_trans.py``) keeps, per
class, Gaussians (``retain.layers.gaussian``) of the intermediate class token and of the prompted
feature, and the mean prompt of its training images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .gaussian import ClassGaussians, Regulariser
from .prompts import block_inputs, insert_tokens, num_prefix_tokens
from .rows import RowDropout


class GeneratorMlp(nn.Module):
    """drop(fc2(drop(GELU(fc1(x))))): ``Self_Prompts.Mlp`` at the head commit, no residual;
    dropout drawn per row of the global batch (``retain.layers.rows``)."""

    def __init__(self, dim: int, drop: float = 0.1):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.drop = RowDropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))  # no identity path


class ExtraTokens(nn.Module):
    """Learnable tokens, one per class, in one block per task (so old blocks can be frozen)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.blocks = nn.ParameterList()

    def __len__(self) -> int:
        return sum(b.shape[0] for b in self.blocks)

    def grow(self, count: int, generator: torch.Generator | None = None) -> None:
        """Add a block of ``count`` tokens: N(0, 0.02²) for the first block, U(0, 1) after."""
        if count <= 0:
            return
        if len(self.blocks) == 0:
            new = torch.randn(count, self.dim, generator=generator) * 0.02
        else:
            new = torch.rand(count, self.dim, generator=generator)
        ref = next(self.parameters(), None)
        self.blocks.append(nn.Parameter(new if ref is None else new.to(ref)))

    def freeze(self) -> None:
        """Freeze every block added so far (the tokens of past tasks)."""
        for b in self.blocks:
            b.requires_grad_(False)

    def all(self) -> torch.Tensor:
        return torch.cat(list(self.blocks))  # (T, D)


def cross_attention(u: torch.Tensor, tokens: torch.Tensor, q: nn.Linear, k: nn.Linear,
                    v: nn.Linear, proj: nn.Linear, heads: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``MyAttention`` with ``cross_attn_wo_x=False``: u (B, D) against [u; tokens (T, D)].

    Returns the output (B, D) (before any residual) and the raw logits (B, H, 1+T).
    """
    b, d = u.shape
    dh, scale = d // heads, (d // heads) ** -0.5
    kv_in = torch.cat([u.unsqueeze(1), tokens.unsqueeze(0).expand(b, -1, -1)], 1)  # (B, 1+T, D)
    qh = q(u).view(b, heads, 1, dh) * scale  # (B, H, 1, dh)
    kh = k(kv_in).view(b, -1, heads, dh).transpose(1, 2)  # (B, H, 1+T, dh)
    vh = v(kv_in).view(b, -1, heads, dh).transpose(1, 2)  # (B, H, 1+T, dh)
    logits = qh @ kh.transpose(-2, -1)  # (B, H, 1, 1+T)
    weights = logits.softmax(-1) * scale  # the reference scales again after the softmax
    out = (weights @ vh).reshape(b, d)  # (B, D)
    return proj(out), logits.squeeze(2)  # (B, D), (B, H, 1+T)


class PromptGenerator(nn.Module):
    """APG: query token (B, D) -> one prompt (B, 1, D) and raw attention logits (B, H, 1+T)."""

    def __init__(self, dim: int, heads: int = 4, residual: bool = False, drop: float = 0.1,
                 generator: torch.Generator | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"apg: width {dim} is not divisible by {heads} generator heads")
        self.heads, self.residual = heads, residual
        self.mlp_in, self.mlp_out = GeneratorMlp(dim, drop), GeneratorMlp(dim, drop)
        self.norm = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        for m in self.modules():
            if isinstance(m, nn.Linear):  # timm's _init_vit_weights
                nn.init.trunc_normal_(m.weight, std=0.02, generator=generator)
                nn.init.zeros_(m.bias)
        self.tokens = ExtraTokens(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.norm(self.mlp_in(x))  # (B, D)
        out, logits = cross_attention(u, self.tokens.all(), self.q, self.k, self.v, self.proj,
                                      self.heads)  # (B, D), (B, H, 1+T)
        if self.residual:
            out = out + u
        return self.mlp_out(out).unsqueeze(1), logits  # (B, 1, D), (B, H, 1+T)


class ProxyLinear(nn.Module):
    """``TransClassifiers``: K linear proxies per class, pooled by their own softmax."""

    def __init__(self, dim: int, proxies: int = 10):
        super().__init__()
        self.proxies = proxies
        self.weight = nn.Parameter(torch.zeros(0, dim))  # (C·K, D), class-major
        self.bias = nn.Parameter(torch.zeros(0))  # (C·K,)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0] // self.proxies

    @torch.no_grad()
    def expand(self, num_classes: int, generator: torch.Generator | None = None) -> None:
        """New proxies ~ N(0, 1/D) (kaiming normal, linear gain) with zero bias."""
        new = (num_classes - self.num_classes) * self.proxies
        if new <= 0:
            return
        d = self.weight.shape[1]
        w = torch.randn(new, d, generator=generator) / math.sqrt(d)
        self.weight = nn.Parameter(torch.cat([self.weight.data, w.to(self.weight)]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, self.bias.new_zeros(new)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, self.weight, self.bias).view(len(x), -1, self.proxies)  # (B, C, K)
        return (z.softmax(-1) * z).sum(-1)  # (B, C)


# ------------------------------------------------------------------------------------- losses

def soft_triplet_kl(x: torch.Tensor, labels: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``SoftTripletLossWithKLDiv`` (margin None) on logits x (N, T) with labels (N,).

    d[i, j] = KL(p_j ‖ p_i), p = softmax(x); for every i the hardest positive (largest d among
    equal labels, i included) and hardest negative (smallest d among other labels) give
    ℓ_i = −Σ_{a∈{ap, an}} softmax(d_ap, d_an)_a.detach() · log softmax(d_ap, d_an)_a.
    """
    logp = F.log_softmax(x, -1)  # (N, T)
    p = logp.exp()
    dist = (p * (p + eps).log()).sum(1).unsqueeze(0) - logp @ p.T  # (N, N) [i, j] = KL(p_j‖p_i)
    same = (labels.unsqueeze(0) == labels.unsqueeze(1)).float()  # (N, N)
    ap_val, ap_idx = (dist - 9999.0 * (1 - same)).max(1)  # (N,)
    an_val, an_idx = (dist + 9999.0 * same).min(1)  # (N,)
    log_pair = F.log_softmax(torch.stack([ap_val, an_val], 1), 1)  # (N, 2)
    ref = torch.stack([dist.gather(1, ap_idx[:, None])[:, 0],
                       dist.gather(1, an_idx[:, None])[:, 0]], 1).softmax(1).detach()  # (N, 2)
    return -(ref * log_pair).mean(0).sum()


def attention_loss(logits: torch.Tensor, targets: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``KLDivTripletWithHardCe``: raw logits (B, H, 1+T) minus the self column, one row per
    head, against the sample's class (= its extra token): CE(rows/τ, y) + soft_triplet_kl."""
    rows = logits[..., 1:].reshape(-1, logits.shape[-1] - 1).float()  # (B·H, T)
    y = targets.repeat_interleave(logits.shape[1])  # (B·H,)
    return F.cross_entropy(rows / tau, y) + soft_triplet_kl(rows, y)


# ----------------------------------------------------------------------------- centre library

class CenterLibrary:
    """The centre library: Gaussians of the intermediate class token and of the prompted
    feature, and the mean prompt, of every class learned so far."""

    def __init__(self, dim: int, eps: float, reg: Regulariser = "identity"):
        self.query = ClassGaussians(dim, eps, reg)
        self.feature = ClassGaussians(dim, eps, reg)
        self.prompts = torch.zeros(0, dim)  # (C, D), rows in the order of query.labels

    def __len__(self) -> int:
        return len(self.query)

    def extended(self, query, prompts, feats, targets, classes) -> CenterLibrary:
        """A copy with the statistics of ``classes`` added (self is left as it is)."""
        out = CenterLibrary(self.prompts.shape[1], self.query.eps, self.query.reg)
        out.load(self.state())
        out.query.add(query, targets, classes)
        out.feature.add(feats, targets, classes)
        means = torch.stack([prompts[targets == c].mean(0) for c in classes])  # (k, D)
        out.prompts = torch.cat([self.prompts, means])
        return out

    def sampler(self, device):
        """(n, generator) -> n draws per class, on ``device``: query (n·C, D), feature (n·C, D),
        mean prompt (n·C, D), labels (n·C,). Factors are taken once and kept on ``device``."""
        classes = self.query.labels.tolist()
        q, f = (s.sampler(classes).to(device) for s in (self.query, self.feature))
        prompts = self.prompts.to(device)  # (C, D)

        def draw(n: int, g: torch.Generator):
            (cq, labels), (cf, _) = q(n, g), f(n, g)  # (C·n, D) each, noise drawn on the CPU
            return cq, cf, prompts.repeat_interleave(n, 0), labels

        return draw

    def state(self) -> dict[str, torch.Tensor]:
        return {**self.query.state("lib.query."), **self.feature.state("lib.feature."),
                "lib.prompts": self.prompts}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.query.load(state, "lib.query.")
        self.feature.load(state, "lib.feature.")
        self.prompts = state["lib.prompts"].float()


class APGNet(nn.Module):
    """Frozen ViT + generator + proxy head: images -> (logits, feature, attention logits,
    prompts, mean L1 norm of the intermediate tokens[, intermediate class token])."""

    def __init__(self, vit: nn.Module, generator: PromptGenerator, head: ProxyLinear, layer: int):
        super().__init__()
        self.vit, self.generator, self.head, self.layer = vit, generator, head, layer

    def train(self, mode: bool = True) -> APGNet:
        super().train(mode)
        self.vit.eval()  # the frozen ViT never trains
        return self

    def forward(self, x: torch.Tensor, with_query: bool = False):
        at, found = num_prefix_tokens(self.vit), {}

        def edit(seq: torch.Tensor) -> torch.Tensor:  # (B, N, D) leaving block L
            found["query"] = seq[:, 0]  # (B, D) intermediate class token
            found["norm"] = seq.detach().abs().sum(-1).mean()  # other_token_norm
            found["prompts"], found["attn"] = self.generator(seq[:, 0])  # (B,1,D), (B,H,1+T)
            return insert_tokens(seq, found["prompts"], at)  # (B, N+1, D)

        with block_inputs(self.vit, {self.layer + 1: edit}):
            feat = self.vit.forward_features(x)[:, 0]  # (B, D) class token after the norm
        out = (self.head(feat), feat, found["attn"], found["prompts"], found["norm"])
        return (*out, found["query"]) if with_query else out


class Described(nn.Module):
    """Images -> [intermediate class token, prompt, feature] (B, 3D): the library's inputs."""

    def __init__(self, net: APGNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, feat, _, prompts, _, query = self.net(x, with_query=True)
        return torch.cat([query, prompts[:, 0], feat], 1)  # (B, 3D)
