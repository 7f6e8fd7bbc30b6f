"""Stored training samples (exemplars, or all past data for joint training), with exact state.

Samples are kept as they came (uint8 images or file paths) with their stream labels and their
position in the full split, so cached features of stored samples are reused.
"""

from __future__ import annotations

import numpy as np
import torch

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


def _encode_str(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(s.encode()), dtype=torch.uint8)


def _decode_str(t: torch.Tensor) -> str:
    return bytes(t.numpy().tobytes()).decode()


def _encode_paths(paths: np.ndarray) -> torch.Tensor:
    return _encode_str("\n".join(map(str, paths)))


def _decode_paths(t: torch.Tensor) -> np.ndarray:
    return np.array(_decode_str(t).split("\n"), dtype=object)
