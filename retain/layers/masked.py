"""SupSup's masked layers (Wortsman et al., "Supermasks in Superposition", NeurIPS 2020;
RAIVNLab/supsup ``models/modules.py``, ``models/module_util.py``, ``mnist.ipynb``).

A masked layer holds a frozen random weight W with "signed constant" values (the sign of a
Kaiming-uniform draw times gain/sqrt(fan_in), gain sqrt(2); no bias) and one binary mask per task
("slot"): task t computes with W * M_t. While slot t trains, M_t comes from a real score tensor S_t
(Kaiming-uniform(a=sqrt(5)) init), with a straight-through gradient:

- ``topk``: M keeps the n - floor((1 - density) n) entries of largest |S| (official ``GetSubnet``,
  whose "sparsity" is this density); the gradient reaches S through |S|, i.e. times sign(S);
- ``threshold``: M = 1[S >= 0] (``GetSubnetFast``), its density learned (about 1/2 at init).

After its task a slot is frozen: the scores are dropped and the mask kept as bool (checkpoints
pack it to 1 bit). The superposition W * sum_i alpha_i M_i is built lazily from the bool masks of
the slots with alpha_i != 0 (the official ``cache_masks`` stacks float masks of every slot).
Scores of slot j start from a fixed draw seeded by (layer seed, j), so a slot never trained is a
reproducible random mask (what SupSup's task-free detector compares against).

``MultitaskBatchNorm`` is SupSup's ``MultitaskNonAffineBN``: no affine parameters, running
statistics per slot, so learning one task never moves another task's statistics.

``SupermaskNet`` runs a ``build_net`` network whose masked layers and norms all follow one
*selector*: an int slot, or a (T,) tensor of superposition weights alpha; ``alpha_gradients``
gives every sample's own gradient of a per-sample objective with respect to alpha.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StateError
from .resnet import InjectedBlock

Selector = int | torch.Tensor  # a slot, or (T,) superposition weights over slots 0..T-1


class TopKMask(torch.autograd.Function):
    """Keep the n - floor((1 - density) n) largest entries (exact count); straight-through."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, density: float) -> torch.Tensor:
        n = scores.numel()
        kept = n - int((1 - density) * n)
        mask = torch.zeros_like(scores)
        mask.view(-1)[scores.flatten().topk(kept).indices] = 1.0
        return mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class ThresholdMask(torch.autograd.Function):
    """1[scores >= 0]; straight-through."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        return (scores >= 0).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


def seeded_uniform(shape: tuple[int, ...], bound: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed % 2**63)
    return torch.empty(shape).uniform_(-bound, bound, generator=g)


class MaskedLayer(nn.Module):
    """Base of ``MaskedLinear``/``MaskedConv2d``: frozen W, per-slot scores (training) or masks."""

    def __init__(self, shape: tuple[int, ...], fan_in: int, mask: str = "threshold",
                 density: float = 0.5):
        super().__init__()
        if mask not in ("threshold", "topk"):
            raise ValueError(f"mask must be 'threshold' or 'topk', not {mask!r}")
        self.shape, self.fan_in, self.mode, self.density = shape, fan_in, mask, density
        self.seed = 0
        self.register_buffer("weight", torch.zeros(shape))
        self.scores = nn.ParameterDict()  # str(slot) -> scores, while the slot is trainable

    def reset(self, seed: int) -> None:
        """Signed-constant weights (and every slot's initial scores) drawn from ``seed``."""
        self.seed = seed
        sign = seeded_uniform(self.shape, 1.0, hash((seed, -1))).sign()
        self.weight.copy_(sign * math.sqrt(2.0) / math.sqrt(self.fan_in))

    def initial_scores(self, slot: int) -> torch.Tensor:
        """Kaiming-uniform(a=sqrt(5)) scores of ``slot``: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        scores = seeded_uniform(self.shape, 1.0 / math.sqrt(self.fan_in), hash((self.seed, slot)))
        return scores.to(self.weight.device)

    def add_slot(self, slot: int, scores: torch.Tensor | None = None) -> nn.Parameter:
        """Make ``slot`` trainable (from its initial scores unless given); returns its scores."""
        s = self.initial_scores(slot) if scores is None else scores.to(self.weight.device)
        self.scores[str(slot)] = nn.Parameter(s.clone())
        return self.scores[str(slot)]

    @torch.no_grad()
    def freeze(self, slot: int, mask: torch.Tensor | None = None) -> None:
        """Keep ``slot``'s mask as bool (from its scores unless given) and drop its scores."""
        if mask is None:
            mask = self._from_scores(self.scores.pop(str(slot))) > 0
        self.register_buffer(f"mask_{slot}", mask.to(self.weight.device, torch.bool))

    def frozen(self, slot: int) -> torch.Tensor | None:
        return getattr(self, f"mask_{slot}", None)

    def _from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        if self.mode == "topk":
            return TopKMask.apply(scores.abs(), self.density)
        return ThresholdMask.apply(scores)

    def mask(self, slot: int) -> torch.Tensor:
        """Float mask of ``slot``: from its scores (straight-through), frozen, or initial."""
        if str(slot) in self.scores:
            return self._from_scores(self.scores[str(slot)])
        frozen = self.frozen(slot)
        if frozen is not None:
            return frozen.to(self.weight.dtype)
        return self._from_scores(self.initial_scores(slot)).detach()

    def superposed(self, alphas: torch.Tensor) -> torch.Tensor:
        """sum_i alpha_i M_i over the slots with alpha_i != 0 (differentiable in alpha)."""
        active = torch.nonzero(alphas.detach()).flatten().tolist()
        return sum(alphas[i] * self.mask(i) for i in active)

    def forward(self, x: torch.Tensor, sel: Selector) -> torch.Tensor:
        m = self.mask(sel) if isinstance(sel, int) else self.superposed(sel)
        return self.apply_weight(x, self.weight * m)

    def slot_output(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """The layer's output on ``x`` with the single mask of ``slot`` (no gradient)."""
        return self.apply_weight(x, self.weight * self.mask(slot).detach())

    def apply_weight(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_weights(self) -> int:
        return self.weight.numel()


class MaskedLinear(MaskedLayer):
    def __init__(self, in_features: int, out_features: int, **kw):
        super().__init__((out_features, in_features), in_features, **kw)

    def apply_weight(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w)  # (B, out)


class MaskedConv2d(MaskedLayer):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, padding: int,
                 stride: int = 1, **kw):
        super().__init__((out_channels, in_channels, kernel, kernel), in_channels * kernel**2, **kw)
        self.padding, self.stride = padding, stride

    def apply_weight(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, stride=self.stride, padding=self.padding)  # (B, out, H', W')


class MultitaskBatchNorm(nn.Module):
    """Non-affine batch norm with running statistics per slot (``MultitaskNonAffineBN``).

    Training a slot normalises with batch statistics and updates that slot's running statistics
    only; evaluation uses the slot's. A superposition uses the alpha-weighted mean of the slots'
    statistics, held constant (not differentiated) in the task-inference gradient.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum

    def add_slot(self, slot: int, mean: torch.Tensor | None = None,
                 var: torch.Tensor | None = None, device: torch.device | None = None) -> None:
        c = self.num_features
        mean = torch.zeros(c) if mean is None else mean.clone()
        var = torch.ones(c) if var is None else var.clone()
        self.register_buffer(f"mean_{slot}", mean.to(device))
        self.register_buffer(f"var_{slot}", var.to(device))

    def stats(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean = getattr(self, f"mean_{slot}", None)
        if mean is None:  # a slot never trained (task-free candidates): identity statistics
            return torch.zeros(self.num_features), torch.ones(self.num_features)
        return mean, getattr(self, f"var_{slot}")

    def forward(self, x: torch.Tensor, sel: Selector) -> torch.Tensor:
        if isinstance(sel, int):
            mean, var = (s.to(x.device) for s in self.stats(sel))  # the buffers themselves
            return F.batch_norm(x, mean, var, training=self.training, momentum=self.momentum,
                                eps=self.eps)
        a = sel.detach()
        active = torch.nonzero(a).flatten().tolist()
        mean = sum(a[i] * self.stats(i)[0].to(x) for i in active) / a.sum()
        var = sum(a[i] * self.stats(i)[1].to(x) for i in active) / a.sum()
        return F.batch_norm(x, mean, var, training=False, eps=self.eps)


Objective = Callable[[torch.Tensor], torch.Tensor]  # (B, C) logits -> (B,) per-sample values


class SupermaskNet(nn.Module):
    """A ``build_net`` network of masked layers (and per-task norms) driven by one selector."""

    def __init__(self, body: nn.Sequential, seed: int):
        super().__init__()
        self.body = body
        for k, layer in enumerate(self.masked_layers()):
            layer.reset(hash((seed, k)))

    def masked_layers(self) -> list[MaskedLayer]:
        return [m for m in self.body.modules() if isinstance(m, MaskedLayer)]

    def norms(self) -> list[MultitaskBatchNorm]:
        return [m for m in self.body.modules() if isinstance(m, MultitaskBatchNorm)]

    def add_slot(self, slot: int) -> list[nn.Parameter]:
        """Trainable scores for ``slot`` in every masked layer (and its own norm statistics)."""
        device = self.masked_layers()[0].weight.device
        for norm in self.norms():
            norm.add_slot(slot, device=device)
        return [layer.add_slot(slot) for layer in self.masked_layers()]

    def freeze(self, slot: int) -> None:
        for layer in self.masked_layers():
            layer.freeze(slot)

    def forward(self, x: torch.Tensor, sel: Selector, record: list | None = None
                ) -> torch.Tensor:
        """Logits (B, out); ``record`` collects (layer, input, output) of every masked layer."""

        def call(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
            if isinstance(layer, MaskedLayer):
                out = layer(x, sel)
                if record is not None:
                    record.append((layer, x, out))
                return out
            if isinstance(layer, MultitaskBatchNorm):
                return layer(x, sel)
            if isinstance(layer, InjectedBlock):  # residual block: its sub-layers come back here
                return layer(x, call)
            return layer(x)

        for layer in self.body:
            x = call(layer, x)
        return x

    def alpha_gradients(self, x: torch.Tensor, alphas: torch.Tensor, objective: Objective
                        ) -> torch.Tensor:
        """(B, T): row n is d objective(x_n) / d alpha at ``alphas`` (T,), sample by sample.

        Each masked layer is linear in its weight, so d out_n / d alpha_i = layer_i(x_n) (the
        layer with mask i alone), and d F_n / d alpha_i = sum over layers of
        <d F_n / d out_n, layer_i(x_n)>. One backward of sum_n F_n gives every d F_n / d out_n,
        as samples do not interact in evaluation mode.
        """
        record: list = []
        with torch.enable_grad():
            leaf = alphas.detach().clone().requires_grad_(True)  # puts the outputs in a graph
            values = objective(self.forward(x, leaf, record))  # (B,)
            grads = torch.autograd.grad(values.sum(), [out for _, _, out in record])
        g = x.new_zeros(len(x), len(alphas))
        active = torch.nonzero(alphas).flatten().tolist()
        with torch.no_grad():
            for (layer, inp, _), d in zip(record, grads, strict=True):
                for i in active:
                    g[:, i] += (d * layer.slot_output(inp, i)).flatten(1).sum(1)
        return g


class Applied(nn.Module):
    """``fn(x)`` over ``net`` as a module, for ``training.predict_batches`` (which splits the
    positions across the processes of a torchrun launch): one slot's logits, or the slot
    inferred for each sample."""

    def __init__(self, net: SupermaskNet, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.net, self.fn = net, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B,) output entropy -sum_c p_c log p_c (SupSup's H objective)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def superfluous_logsumexp(real: int) -> Objective:
    """SupSup's G objective: logsumexp of all logits with the first ``real`` detached, so the
    gradient flows through the superfluous output neurons only (``se_oneshot_g_minimization``)."""

    def g(logits: torch.Tensor) -> torch.Tensor:
        keep = torch.arange(logits.shape[1], device=logits.device) < real  # (C,)
        mixed = torch.where(keep, logits.detach(), logits)  # (B, C)
        return mixed.logsumexp(1)

    return g


def pack_masks(masks: list[torch.Tensor]) -> torch.Tensor:
    """(T, ceil(n / 8)) uint8: every bool mask at 1 bit per weight."""
    flat = torch.stack([m.flatten() for m in masks]).cpu().numpy()  # (T, n)
    return torch.from_numpy(np.packbits(flat, axis=1))


def unpack_masks(packed: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    n = math.prod(shape)
    bits = np.unpackbits(packed.cpu().numpy(), axis=1)[:, :n].astype(bool)  # (T, n)
    return [torch.from_numpy(b.copy()).view(shape) for b in bits]


def weights_digest(net: SupermaskNet) -> torch.Tensor:
    """SHA-256 (32 uint8) of the frozen weights of every masked layer, in order: what a state
    stores instead of the weights, to check that they are regenerated bit for bit."""
    h = hashlib.sha256()
    for layer in net.masked_layers():
        h.update(layer.weight.detach().cpu().contiguous().numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


def check_regenerated(net: SupermaskNet, digest: torch.Tensor | None, name: str) -> None:
    """Refuse a state whose frozen weights ``net`` does not regenerate (None: an older state
    without a digest, accepted)."""
    if digest is None:
        return
    if not torch.equal(weights_digest(net), digest.to(torch.uint8).cpu()):
        raise StateError(f"{name}: this installation regenerates other frozen weights than the "
                         f"run that saved this state (torch's generator or Python's hash "
                         f"differ); load it with the torch/Python versions of that run, or "
                         f"start a fresh run")
