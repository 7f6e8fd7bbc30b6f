"""Frozen-backbone features, computed once per image and reused across tasks, methods and seeds.

Entries are keyed by content: the backbone key (weights sha256 + preprocessing), the numeric
mode (fp32 or bf16 autocast) and the split's content key; rows are the positions of the images in
their full split. On disk each newly embedded batch of rows becomes one safetensors shard, written
atomically under a name derived from its rows, so concurrent runs never corrupt an entry (at worst
two runs embed the same rows once each). ``images_embedded`` counts backbone passes per image.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import Backbone
from .datasets.base import Split
from .io import read_tensors, write_tensors


def default_cache_dir() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "retain" / "features"


class _Entry:
    """Rows of one (backbone, split) pair: a growable (N, D) table and a filled mask."""

    def __init__(self, dim: int):
        self.rows = torch.zeros(0, dim)
        self.filled = np.zeros(0, dtype=bool)

    def put(self, index: np.ndarray, feats: torch.Tensor) -> None:
        need = int(index.max()) + 1 if len(index) else 0
        if need > len(self.filled):
            grown = torch.zeros(need, self.rows.shape[1])
            grown[: len(self.rows)] = self.rows
            self.rows = grown
            self.filled = np.concatenate([self.filled, np.zeros(need - len(self.filled), bool)])
        self.rows[torch.from_numpy(index)] = feats.float()
        self.filled[index] = True

    def missing(self, index: np.ndarray) -> np.ndarray:
        inside = index < len(self.filled)
        have = np.zeros(len(index), dtype=bool)
        have[inside] = self.filled[index[inside]]
        return np.unique(index[~have])


class FeatureCache:
    """Backbone features per image; ``root=None`` keeps them in memory only."""

    def __init__(self, root: str | Path | None = None):
        self.root = None if root is None else Path(root)
        self._entries: dict[str, _Entry] = {}
        self.images_embedded = 0

    def features(self, backbone: Backbone, split: Split, *, device: torch.device | str = "cpu",
                 batch_size: int = 64, autocast: bool = False, progress: bool = False
                 ) -> torch.Tensor:
        """(len(split), D) float32 features of ``split``'s images, embedding only missing ones."""
        key = f"{backbone.key}-{'bf16' if autocast else 'fp32'}/{split.key}"
        entry = self._entry(key, backbone.feature_dim)
        todo = entry.missing(split.index)
        if len(todo):
            feats = embed(backbone, split, todo, device=device, batch_size=batch_size,
                          autocast=autocast, progress=progress)
            self.images_embedded += len(todo)
            entry.put(todo, feats)
            self._save_shard(key, todo, feats)
        return entry.rows[torch.from_numpy(split.index)]

    def _entry(self, key: str, dim: int) -> _Entry:
        if key not in self._entries:
            entry = _Entry(dim)
            for shard in sorted(self._dir(key).glob("*.safetensors")) if self.root else []:
                t = read_tensors(shard)
                entry.put(t["index"].numpy(), t["features"])
            self._entries[key] = entry
        return self._entries[key]

    def _dir(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key

    def _save_shard(self, key: str, index: np.ndarray, feats: torch.Tensor) -> None:
        if self.root is None:
            return
        name = hashlib.sha256(index.tobytes()).hexdigest()[:16]
        write_tensors(self._dir(key) / f"{name}.safetensors",
                      {"index": torch.from_numpy(index), "features": feats.float()})


@torch.no_grad()
def embed(backbone: Backbone, split: Split, index: np.ndarray, *, device: torch.device | str,
          batch_size: int = 64, autocast: bool = False, progress: bool = False) -> torch.Tensor:
    """Run the frozen backbone on the images of ``split`` whose full-split index is in ``index``."""
    pos_of = {int(i): p for p, i in enumerate(split.index)}
    positions = np.array([pos_of[int(i)] for i in index], dtype=np.int64)
    model = backbone.model.to(device).eval()
    device = torch.device(device)
    out = []
    bar = tqdm(total=len(positions), desc=f"embed {backbone.name}", unit="img",
               disable=not progress, leave=False)
    for start in range(0, len(positions), batch_size):
        x = backbone.preprocess(split, positions[start : start + batch_size]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out.append(model(x).float().cpu())  # (B, D)
        bar.update(len(x))
    bar.close()
    return torch.cat(out)
