"""What a method may use besides its task: device, batch size, numeric mode and the cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backbones import Backbone
from .datasets.base import Split
from .features import FeatureCache


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> the first of cuda, mps, cpu that is present."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class Context:
    """Run-wide settings handed to ``learn`` and ``predict``; holds no method state."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 64
    autocast: bool = False  # bf16 autocast for frozen backbone passes
    seed: int = 1993
    progress: bool = False
    cache: FeatureCache = field(default_factory=FeatureCache)

    def features(self, backbone: Backbone, split: Split) -> torch.Tensor:
        """(N, D) frozen features of ``split`` on the CPU, from the cache where possible."""
        return self.cache.features(backbone, split, device=self.device,
                                   batch_size=self.batch_size, autocast=self.autocast,
                                   progress=self.progress)

    def generator(self, *salt: int) -> torch.Generator:
        """A torch generator seeded by the run seed and ``salt`` (e.g. the task id)."""
        g = torch.Generator()
        g.manual_seed(hash((self.seed, *salt)) % (2**63))
        return g
