"""Stored training samples (exemplars, or all past data for joint training), with exact state.

Samples are kept as they came (uint8 images or file paths) with their stream labels and their
position in the full split, so cached features of stored samples are reused.

- ``SampleStore``: append-only (joint training keeps everything).
- ``ExemplarMemory``: a rehearsal memory of a few exemplars per class, under a fixed total budget
  (``budget // classes seen`` per class, old classes shrunk to the first entries of their
  selection order when new ones arrive: iCaRL, DyTox) or a fixed number per class. Exemplars are
  chosen by herding (iCaRL's greedy mean matching), by distance to the class mean, or at random.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .datasets.base import Split


class SampleStore:
    """An append-only store of samples from one full split (the training split of a stream)."""

    def __init__(self):
        self.parts: list[Split] = []

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def add(self, split: Split) -> None:
        if len(split):
            self.parts.append(split)

    def as_split(self) -> Split:
        return Split.concat(self.parts)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        if not self.parts:
            return {}
        s = self.as_split()
        data = (_encode_paths(s.data) if s.is_paths
                else torch.from_numpy(np.ascontiguousarray(s.data)))
        return {f"{prefix}data": data, f"{prefix}targets": torch.from_numpy(s.targets),
                f"{prefix}index": torch.from_numpy(s.index), f"{prefix}paths":
                torch.tensor(int(s.is_paths)), f"{prefix}key": _encode_str(s.key)}

    def load(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        self.parts = []
        if f"{prefix}data" not in state:
            return
        raw = state[f"{prefix}data"]
        data = _decode_paths(raw) if int(state[f"{prefix}paths"]) else raw.numpy()
        self.parts = [Split(data, state[f"{prefix}targets"].numpy(),
                            key=_decode_str(state[f"{prefix}key"]),
                            index=state[f"{prefix}index"].numpy())]



Selection = Literal["herding", "barycenter", "random"]


class ExemplarMemory:
    """Exemplars per class under a total ``budget`` (or ``budget`` per class if ``per_class``).

    >>> memory = ExemplarMemory(2000)                      # DyTox / iCaRL: 2,000 in total
    >>> memory.update(task.train, features)                # after learning the task
    >>> replay = memory.as_split()                         # old (and new) classes' exemplars

    Within each class the exemplars are kept in selection order (herding rank), so shrinking a
    class keeps its best-ranked ones. ``features`` (N, D) of ``split`` drive herding and
    barycenter selection; compute them without augmentation (DyTox issue #5).
    """

    def __init__(self, budget: int, *, per_class: bool = False, selection: Selection = "herding"):
        if budget < 0:
            raise ValueError(f"memory budget must be >= 0, got {budget}")
        if selection not in ("herding", "barycenter", "random"):
            raise ValueError(f"unknown exemplar selection {selection!r}")
        self.budget = budget
        self.per_class = per_class
        self.selection = selection
        self.by_class: dict[int, Split] = {}  # class -> its exemplars, best first (never empty)
        self.num_classes = 0  # classes seen (more than len(by_class) when the quota reaches 0)

    def __len__(self) -> int:
        return sum(len(s) for s in self.by_class.values())

    @property
    def classes(self) -> list[int]:
        return sorted(self.by_class)

    def quota(self, num_classes: int) -> int:
        """Exemplars per class once ``num_classes`` classes are seen."""
        if self.per_class:
            return self.budget
        return self.budget // max(num_classes, 1)

    def update(self, split: Split, features: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> None:
        """Select exemplars of every class in ``split`` (replacing any it already had) and shrink
        the other classes to the new quota. ``features`` (len(split), D) are needed for herding
        and barycenter; ``generator`` draws the random selection."""
        new = [int(c) for c in np.unique(split.targets)]
        self.num_classes = len(set(self.by_class) | set(new))
        q = self.quota(self.num_classes)
        kept = {c: s.subset(np.arange(min(q, len(s)))) for c, s in self.by_class.items()}
        for c in new:
            pos = np.flatnonzero(split.targets == c)
            feats = None if features is None else features[torch.from_numpy(pos)]
            kept[c] = split.subset(pos[self._select(feats, len(pos), q, generator)])
        self.by_class = {c: s for c, s in kept.items() if len(s)}  # a quota of 0 drops a class

    def _select(self, feats: torch.Tensor | None, n: int, m: int,
                generator: torch.Generator | None) -> np.ndarray:
        if self.selection == "random":
            return torch.randperm(n, generator=generator)[:m].numpy()
        if feats is None:
            raise ValueError(f"{self.selection} selection needs the features of the samples")
        pick = herding if self.selection == "herding" else barycenter
        return pick(feats, m).numpy()

    def as_split(self) -> Split:
        """Every exemplar, class by class (classes in increasing label order)."""
        if not self.by_class:
            raise ValueError("the exemplar memory is empty")
        return Split.concat([self.by_class[c] for c in self.classes])

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        store = SampleStore()
        for c in self.classes:
            store.add(self.by_class[c])
        counts = [len(self.by_class[c]) for c in self.classes]
        return {f"{prefix}classes": torch.tensor(self.classes, dtype=torch.long),
                f"{prefix}counts": torch.tensor(counts, dtype=torch.long),
                f"{prefix}num_classes": torch.tensor(self.num_classes),
                **store.state(f"{prefix}store.")}

    def load(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        self.num_classes = int(state[f"{prefix}num_classes"])
        store = SampleStore()
        store.load(state, f"{prefix}store.")
        classes = state[f"{prefix}classes"].tolist()
        counts = state[f"{prefix}counts"].tolist()
        if not classes:
            self.by_class = {}
            return
        whole, bounds = store.as_split(), np.cumsum([0, *counts])
        self.by_class = {c: whole.subset(np.arange(bounds[i], bounds[i + 1]))
                         for i, c in enumerate(classes)}


def herding(features: torch.Tensor, m: int, normalize: bool = True) -> torch.Tensor:
    """iCaRL's herding (Rebuffi et al., CVPR 2017, Alg. 4): positions of the m samples chosen
    greedily, each the one that brings the mean of the chosen closest to the class mean.

    Features are L2-normalised first (iCaRL; DyTox ``icarl_selection``); a sample is chosen once.
    """
    f = features.double()
    f = F.normalize(f, dim=1) if normalize else f  # (n, D)
    mu = f.mean(0)  # (D,)
    total = torch.zeros_like(mu)
    free = torch.ones(len(f), dtype=torch.bool)
    chosen = []
    for k in range(1, min(m, len(f)) + 1):
        dist = (mu - (total + f) / k).norm(dim=1)  # (n,)
        i = int(dist.masked_fill(~free, float("inf")).argmin())
        chosen.append(i)
        total += f[i]
        free[i] = False
    return torch.tensor(chosen, dtype=torch.long)


def barycenter(features: torch.Tensor, m: int) -> torch.Tensor:
    """Positions of the m samples closest to the class mean, closest first (DyTox
    ``closest_all``)."""
    f = features.double()
    dist = (f - f.mean(0)).pow(2).sum(1)  # (n,)
    return torch.argsort(dist, stable=True)[:m]

def _encode_str(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(s.encode()), dtype=torch.uint8)


def _decode_str(t: torch.Tensor) -> str:
    return bytes(t.numpy().tobytes()).decode()


def _encode_paths(paths: np.ndarray) -> torch.Tensor:
    return _encode_str("\n".join(map(str, paths)))


def _decode_paths(t: torch.Tensor) -> np.ndarray:
    return np.array(_decode_str(t).split("\n"), dtype=object)
