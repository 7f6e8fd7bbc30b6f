"""What a method may use besides its task: device, batch size, numeric mode and the cache.

``Context()`` has the command line's defaults: the first device present (CUDA, MPS, else CPU),
a batch size of 16 on the CPU and 128 elsewhere, the disk feature cache the CLI uses
(``~/.cache/retain/features``, or ``$XDG_CACHE_HOME/retain/features``) and progress bars when
stderr is a terminal. Each can be overridden: ``Context(device="cpu", cache=FeatureCache())``
keeps features in memory only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from .backbones import Backbone
from .datasets.base import Split
from .distributed import Dist
from .errors import ConfigError
from .features import FeatureCache, default_cache_dir


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' -> the first of cuda, mps, cpu that is present; any other name is checked to be
    present here (a ConfigError names the devices that are)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps "
                          f"(present here: {', '.join(present_devices())})") from None
    missing = (device.type == "cuda" and (not torch.cuda.is_available() or
                                          (device.index or 0) >= torch.cuda.device_count())
               or device.type == "mps" and not _mps()
               or device.type not in ("cpu", "cuda", "mps"))
    if missing:
        raise ConfigError(f"device {name!r} is not present here; present: "
                          f"{', '.join(present_devices())} (or --device auto)")
    return device


def present_devices() -> list[str]:
    """The device names this machine offers, e.g. ['cpu', 'cuda:0', 'cuda:1']."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return ["cpu", *cuda, *(["mps"] if _mps() else [])]


def _mps() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def default_batch_size(device: torch.device) -> int:
    """16 on the CPU (memory-bound), 128 on an accelerator: frozen passes and evaluation."""
    return 16 if device.type == "cpu" else 128


@dataclass
class Context:
    """Run-wide settings handed to ``learn`` and ``predict``; holds no method state.

    ``device``: a torch device or a name ('auto', 'cpu', 'cuda:1'); ``batch_size`` None: 16 on
    the CPU, 128 elsewhere; ``progress`` None: bars when stderr is a terminal; ``cache``: the
    disk cache at ``default_cache_dir()`` unless given (``FeatureCache()``: memory only).
    """

    device: torch.device | str = "auto"
    batch_size: int | None = None
    autocast: bool = False  # bf16 autocast for frozen backbone passes
    seed: int = 1993
    progress: bool | None = None
    cache: FeatureCache = field(default_factory=lambda: FeatureCache(default_cache_dir()))
    dist: Dist = field(default_factory=Dist)  # the processes of a torchrun launch (one: no-op)

    def __post_init__(self):
        self.device = resolve_device(self.device)
        if self.batch_size is None:
            self.batch_size = default_batch_size(self.device)
        if self.progress is None:
            self.progress = sys.stderr.isatty()

    def features(self, backbone: Backbone, split: Split) -> torch.Tensor:
        """(N, D) frozen features of ``split`` on the CPU, from the cache where possible."""
        return self.cache.features(backbone, split, device=self.device,
                                   batch_size=self.batch_size, autocast=self.autocast,
                                   progress=self.progress, dist=self.dist)

    def generator(self, *salt: int) -> torch.Generator:
        """A torch generator seeded by the run seed and ``salt`` (e.g. the task id)."""
        g = torch.Generator()
        g.manual_seed(hash((self.seed, *salt)) % (2**63))
        return g
