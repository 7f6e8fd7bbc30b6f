"""The pieces of S-Prompts (Wang et al., NeurIPS 2022; ``retain/methods/sprompts.py``): the
L1 nearest-centroid domain choice, a shallow image prompt inserted for one call, and the network
of one prompt and one classifier (linear head or CoOp text context) per domain."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .coop import DomainContexts
from .heads import IncrementalLinear
from .prompts import insert_tokens, num_prefix_tokens


def nearest_domain(query: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N,) argmin_s min_k ‖q − c_{s,k}‖₁ for queries (N, D) and centroids (S, K, D) (ties to
    the lower domain)."""
    s, k, d = centroids.shape
    dist = torch.cdist(query.double(), centroids.reshape(s * k, d).double(), p=1)  # (N, S·K)
    return dist.view(-1, s, k).amin(2).argmin(1)  # (N,)


@contextmanager
def prompted(vit: nn.Module, tokens: torch.Tensor) -> Iterator[None]:
    """Within the block, ``tokens`` (B, L, D) enter after the class token of the sequence that
    reaches ``norm_pre`` (after the positional embedding, before CLIP's ``ln_pre``)."""
    at = num_prefix_tokens(vit)
    handle = vit.norm_pre.register_forward_pre_hook(
        lambda module, args: (insert_tokens(args[0], tokens, at), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


class SPromptsNet(nn.Module):
    """The frozen image tower, one prompt and one classifier per domain: (images, domains) ->
    logits. Classifier: a linear head (``text`` None) or a CoOp context of ``text``."""

    def __init__(self, vit: nn.Module, text: DomainContexts | None = None):
        super().__init__()
        self.vit, self.text = vit, text
        self.prompts = nn.ParameterList()  # I_s (L, D) each
        self.heads = nn.ModuleList()  # W_s over the classes seen up to domain s (image variant)
        self.num_classes: list[int] = []  # C_s
        self.text_features: list[torch.Tensor] = []  # (C_s, E) stored after training domain s

    def train(self, mode: bool = True) -> SPromptsNet:
        super().train(mode)
        self.vit.eval()  # the frozen towers never train (the reference trains in eval mode too)
        if self.text is not None:
            self.text.text.eval()
        return self

    def add_domain(self, length: int, num_classes: int, generator: torch.Generator | None = None,
                   class_names: tuple[str, ...] = ()) -> None:
        """A new trainable prompt I_s with nn.Linear's default init (U(±1/√D), as
        ``nn.Linear(embd_dim, prompt_length).weight``) and a new head (nn.Linear's init) or
        text context (N(0, 0.02²)); the earlier ones are frozen."""
        for p in [*self.prompts, *self.heads.parameters()]:
            p.requires_grad_(False)
        dim, device = self.vit.embed_dim, next(self.vit.parameters()).device
        bound = dim ** -0.5
        prompt = torch.empty(length, dim).uniform_(-bound, bound, generator=generator)
        self.prompts.append(nn.Parameter(prompt.to(device)))  # (L, D)
        self.num_classes.append(num_classes)
        if self.text is None:
            head = IncrementalLinear(dim)
            head.expand(num_classes, generator)
            self.heads.append(head.to(device))
        else:
            if class_names:
                self.text.set_classes(class_names)
            self.text.add(generator)

    def store_text_features(self, s: int) -> None:
        """Encode domain s's class texts once (frozen from now on) for prediction."""
        if self.text is not None:
            with torch.no_grad():
                self.text_features.append(self.text.features(s, self.num_classes[s]))

    def num_learned(self) -> int:
        own = [*self.prompts, *self.heads.parameters()]
        own += [] if self.text is None else list(self.text.contexts)
        return sum(p.numel() for p in own)

    def forward(self, x: torch.Tensor, domains: torch.Tensor,
                texts: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (B, C) of each sample by its own domain; ``texts`` overrides the stored text
        features of some domains (training)."""
        tokens = torch.stack(list(self.prompts))[domains]  # (B, L, D)
        with prompted(self.vit, tokens):
            if self.text is None:
                feat = self.vit.forward_features(x)[:, 0]  # (B, D) class token
            else:
                feat = F.normalize(self.vit(x), dim=-1)  # (B, E) CLIP image embedding
        return self.logits(feat, domains, texts or {})

    def logits(self, feat: torch.Tensor, domains: torch.Tensor,
               texts: dict[int, torch.Tensor]) -> torch.Tensor:
        """(B, C) scores of each sample by its own domain's classifier (−inf beyond its
        classes)."""
        out = feat.new_full((len(feat), self.num_classes[-1]), float("-inf"))  # (B, C)
        for s in domains.unique().tolist():
            rows = domains == s
            if self.text is None:
                z = self.heads[s](feat[rows])  # (b, C_s)
            else:
                t = texts[s] if s in texts else self.text_features[s]  # (C_s, E)
                z = self.text.text.logit_scale.exp() * feat[rows] @ t.to(feat).T  # (b, C_s)
            out[rows, : z.shape[1]] = z
        return out

    def learned_state(self) -> dict[str, torch.Tensor]:
        state = {"prompts": torch.stack(list(self.prompts)).detach(),  # (S, L, D)
                 "num_classes": torch.tensor(self.num_classes)}  # (S,)
        for s, head in enumerate(self.heads):
            state[f"head.{s}.weight"] = head.weight.detach()  # (C_s, D)
            state[f"head.{s}.bias"] = head.bias.detach()  # (C_s,)
        if self.text is not None:
            state["contexts"] = torch.stack(list(self.text.contexts)).detach()  # (S, M, W)
            state["tokens"] = self.text.tokens  # (C, L)
            state |= {f"text.{s}": t for s, t in enumerate(self.text_features)}  # (C_s, E)
        return state

    def load_learned(self, state: dict[str, torch.Tensor]) -> None:
        prompts = state["prompts"]
        counts = state.get("num_classes")
        for s, prompt in enumerate(prompts):
            n = int(counts[s]) if counts is not None else state[f"head.{s}.weight"].shape[0]
            self.add_domain(prompt.shape[0], n, torch.Generator())  # overwritten below
            with torch.no_grad():
                self.prompts[s].copy_(prompt)
                if self.text is None:
                    self.heads[s].weight.copy_(state[f"head.{s}.weight"])
                    self.heads[s].bias.copy_(state[f"head.{s}.bias"])
                else:
                    self.text.contexts[s].copy_(state["contexts"][s])
        if self.text is not None:
            self.text.tokens = state["tokens"]
            self.text_features = [state[f"text.{s}"] for s in range(len(prompts))]


class DomainTraining(nn.Module):
    """The net while domain s trains: its text features are re-encoded from ctx_s at every
    step (with gradients); a head needs nothing extra."""

    def __init__(self, net: SPromptsNet, s: int):
        super().__init__()
        self.net, self.s = net, s

    def forward(self, x: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        if self.net.text is None:
            return self.net(x, domains)
        texts = {self.s: self.net.text.features(self.s, self.net.num_classes[self.s])}
        return self.net(x, domains, texts)
