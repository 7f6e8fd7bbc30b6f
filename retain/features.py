"""Frozen-backbone features, computed once per image and reused across tasks, methods and seeds.

Entries are keyed by content: the backbone key (weights sha256 + preprocessing), the numeric
mode (fp32 or bf16 autocast) and the split's content key; rows are the positions of the images in
their full split. On disk an entry is a folder of safetensors shards of at most ``shard_rows``
rows, written while embedding (a kill loses at most one shard of work), and ``index.json``, which
records each shard's sha256, rows, shape and dtype with the entry's backbone key, split key and
split size; it is rewritten atomically after each shard. Nothing is trusted unverified: a shard
whose bytes, shape, dtype or rows disagree with the index (or with the split's size) is deleted
and its images embedded again, with one warning line naming it.

An entry is filled under an exclusive lock (``.lock`` in its folder): a second process that
needs the same entry waits, then reads what the first wrote, so concurrent runs on one dataset
and backbone embed each image once in total. ``images_embedded`` counts backbone passes per
image made by this cache object.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import Backbone
from .datasets.base import Split
from .distributed import Dist
from .errors import IntegrityError
from .io import (
    file_lock,
    load_tensors,
    read_bytes,
    read_json,
    safetensors_metadata,
    write_bytes,
    write_json,
)

SHARD_ROWS = 256  # rows per shard: the most work a kill during embedding can lose
INDEX, LOCK = "index.json", ".lock"
MAX_ROWS = 1 << 31  # rows of an entry whose split size is unknown (restored from old checkpoints)
SHARD_NAME = re.compile(r"[0-9a-f]{16}")
log = logging.getLogger("retain.features")


def default_cache_dir() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "retain" / "features"


# ------------------------------------------------------------------------------ rows and shards

def ranges(rows: np.ndarray) -> list[list[int]]:
    """Sorted unique rows as half-open runs: [0, 1, 2, 7] -> [[0, 3], [7, 8]]."""
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return [[int(r[0]), int(r[-1]) + 1] for r in np.split(rows, breaks)]


def unranges(runs, size: int | None) -> np.ndarray:
    """The rows of ``ranges`` output, checked: increasing, disjoint, inside [0, size)."""
    bound = MAX_ROWS if size is None else size
    if not isinstance(runs, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r) for r in runs):
        raise IntegrityError("rows are not a list of [start, stop] integer pairs")
    last = 0
    for start, stop in runs:
        if not last <= start < stop <= bound:
            raise IntegrityError(f"rows [{start}, {stop}) are out of order or outside the "
                                 f"split's {bound} rows")
        last = stop
    if not runs:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in runs])


def shard_record(sha256: str, rows: np.ndarray, dim: int) -> dict:
    return {"sha256": sha256, "rows": ranges(rows), "count": len(rows), "shape": [len(rows), dim],
            "dtype": "float32"}


def check_shard(path: Path, record, *, entry: str, dim: int, size: int | None
                ) -> tuple[np.ndarray, torch.Tensor]:
    """The rows and (n, dim) features of the shard at ``path`` if it agrees with its index
    ``record`` in every respect; an ``IntegrityError`` saying how it does not otherwise."""
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise IntegrityError("its index record is malformed")
    rows = unranges(record.get("rows"), size)
    if record.get("count") != len(rows) or record.get("shape") != [len(rows), dim] \
            or record.get("dtype") != "float32":
        raise IntegrityError(f"its index record (count, shape, dtype) does not describe "
                             f"{len(rows)} float32 rows of {dim} features")
    data = read_bytes(path, record["sha256"])
    tensors = load_tensors(data, path)
    if safetensors_metadata(data, path).get("entry") != entry:
        raise IntegrityError(f"it belongs to another cache entry than {entry}")
    if set(tensors) != {"index", "features"}:
        raise IntegrityError(f"it holds tensors {sorted(tensors)}, not index and features")
    idx, feats = tensors["index"], tensors["features"]
    if idx.dtype != torch.int64 or not torch.equal(idx, torch.from_numpy(rows)):
        raise IntegrityError("its rows differ from those in the index")
    if feats.dtype != torch.float32 or list(feats.shape) != [len(rows), dim]:
        raise IntegrityError(f"its features are {feats.dtype} {list(feats.shape)}, not float32 "
                             f"{[len(rows), dim]}")
    if not torch.isfinite(feats).all():
        raise IntegrityError("its features hold NaN or infinite values")
    return rows, feats


def new_index(entry: str, backbone: str, mode: str, split: str, size: int | None,
              dim: int) -> dict:
    return {"format": 1, "entry": entry, "backbone": backbone, "mode": mode, "split": split,
            "split_size": size, "dim": dim, "shards": {}}


def index_problem(doc, expect: dict) -> str | None:
    """Why ``doc`` is not a usable index for the entry described by ``expect`` (None: it is)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("shards"), dict):
        return "it is not an index of shards"
    for k in ("format", "entry", "backbone", "mode", "split", "dim"):
        if doc.get(k) != expect[k]:
            return f"its {k} is {str(doc.get(k))[:60]!r}, expected {expect[k]!r}"
    size, want = doc.get("split_size"), expect["split_size"]
    if size is not None and (type(size) is not int or size < 0):
        return f"its split_size {size!r} is not a size"
    if None not in (size, want) and size != want:
        return f"its split_size is {size}, the split has {want} images"
    return None


def inspect_entry(folder: Path) -> tuple[list[str], int]:
    """Problems of the cache entry in ``folder`` (read only) and the number of rows verified."""
    path = folder / INDEX
    if not path.is_file():
        return [f"{path} is missing"], 0
    try:
        doc = read_json(path)
    except IntegrityError as e:
        return [str(e)], 0
    header = {k: doc.get(k) for k in ("entry", "backbone", "mode", "split", "dim")} \
        if isinstance(doc, dict) else {}
    problem = index_problem(doc, {**header, "format": 1, "split_size": None})
    if problem or type(header["dim"]) is not int or not isinstance(header["entry"], str):
        return [f"{path}: {problem or 'malformed header (entry, dim)'}"], 0
    problems, rows = [], 0
    for name, rec in doc["shards"].items():
        shard = folder / f"{name}.safetensors"
        try:
            if not SHARD_NAME.fullmatch(name):
                raise IntegrityError("its name is not a shard name")
            r, _ = check_shard(shard, rec, entry=doc["entry"], dim=doc["dim"],
                               size=doc["split_size"])
            rows += len(r)
        except IntegrityError as e:
            problems.append(f"shard {shard}: {e}")
    listed = {f"{n}.safetensors" for n in doc["shards"]}
    problems += [f"shard {p} is not in {path}" for p in sorted(folder.glob("*.safetensors"))
                 if p.name not in listed]
    return problems, rows


# ------------------------------------------------------------------------------------ cache

class _Entry:
    """Rows of one (backbone, split) pair: a growable (N, D) table, a filled mask, the shards
    already read and the entry's index document."""

    def __init__(self, dim: int):
        self.rows = torch.zeros(0, dim)
        self.filled = np.zeros(0, dtype=bool)
        self.loaded: set[str] = set()
        self.doc: dict | None = None

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

    def __init__(self, root: str | Path | None = None, *, shard_rows: int = SHARD_ROWS):
        self.root = None if root is None else Path(root)
        self.shard_rows = shard_rows
        self._entries: dict[str, _Entry] = {}
        self.images_embedded = 0
        self.entries_used: set[str] = set()  # keys "backbone-mode/split", for results.json

    def features(self, backbone: Backbone, split: Split, *, device: torch.device | str = "cpu",
                 batch_size: int = 64, autocast: bool = False, progress: bool = False,
                 dist: Dist | None = None) -> torch.Tensor:
        """(len(split), D) float32 features of ``split``'s images, embedding only missing ones.

        With several processes (``dist``, every rank calling with the same split) the missing
        images are split across ranks and gathered, so every rank returns the same features
        and each image is embedded once in total (``_fill_shared``)."""
        mode = "bf16" if autocast else "fp32"
        key = f"{backbone.key}-{mode}/{split.key}"
        index = split.index
        if len(index) and (index.min() < 0 or index.max() >= (split.size or MAX_ROWS)):
            raise ValueError(f"split rows {index.min()}..{index.max()} lie outside its "
                             f"{split.size} images")
        entry = self._entries.setdefault(key, _Entry(backbone.feature_dim))
        self.entries_used.add(key)
        opts = {"device": device, "batch_size": batch_size, "autocast": autocast,
                "progress": progress}
        if dist is not None and dist.active:
            self._fill_shared(key, entry, backbone, split, mode, opts, dist)
        elif len(entry.missing(index)):
            if self.root is None:
                self._fill(key, entry, backbone, split, entry.missing(index), opts)
            else:
                with self._locked(key):
                    self._refresh(key, entry, backbone, split, mode)
                    todo = entry.missing(index)
                    if len(todo):
                        self._fill(key, entry, backbone, split, todo, opts)
        return entry.rows[torch.from_numpy(index)]

    def _fill_shared(self, key: str, entry: _Entry, backbone: Backbone, split: Split, mode: str,
                     opts: dict, dist: Dist) -> None:
        """The missing rows of ``split`` over the ranks of ``dist``: rank 0 reads the disk entry
        (under its lock) and says which rows are missing; each chunk of ``shard_rows`` of them is
        split across ranks, embedded, gathered in order and written by rank 0 (the shards are
        those of one process). Then every rank holds rank 0's rows of ``split``."""
        index = split.index
        if not dist.any(len(entry.missing(index)) > 0):
            return
        disk, main = self.root is not None, dist.is_main
        lock = self._locked(key) if disk and main else contextlib.nullcontext()
        with lock:
            if disk and main:
                self._refresh(key, entry, backbone, split, mode)
            todo = dist.broadcast_object(entry.missing(index) if main else None)
            opts = opts | {"progress": opts["progress"] and main}
            for c in range(0, len(todo), self.shard_rows):
                rows = todo[c : c + self.shard_rows]
                mine = rows[dist.shard(len(rows), opts["batch_size"])]  # whole batches
                feats = embed(backbone, split, mine, **opts) if len(mine) else None
                self.images_embedded += len(mine)
                feats = dist.gather_rows(feats)  # (len(rows), D) in the order of rows
                if feats.shape != (len(rows), backbone.feature_dim):
                    raise ValueError(f"backbone {backbone.name} gave features of shape "
                                     f"{tuple(feats.shape)}, not (n, {backbone.feature_dim})")
                entry.put(rows, feats)
                if disk and main:
                    self._save_shard(key, entry, rows, feats)
        if disk:  # rows rank 0 read from the disk entry
            have = dist.broadcast_(entry.rows[torch.from_numpy(index)] if main else
                                   torch.zeros(len(index), backbone.feature_dim))
            entry.put(index, have)

    def _dir(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key

    def _locked(self, key: str):
        folder = self._dir(key)

        def waiting(pid):
            log.warning(f"feature cache: {folder} is being filled by another process "
                        f"(pid {pid or '?'}); waiting for it, then reading its features")

        return file_lock(folder / LOCK, wait=True, what=f"feature cache entry {folder}",
                         on_wait=waiting)

    def _fill(self, key: str, entry: _Entry, backbone: Backbone, split: Split, todo: np.ndarray,
              opts: dict) -> None:
        for rows, feats in embed_chunks(backbone, split, todo, chunk=self.shard_rows, **opts):
            if feats.shape != (len(rows), backbone.feature_dim):
                raise ValueError(f"backbone {backbone.name} gave features of shape "
                                 f"{tuple(feats.shape)}, not (n, {backbone.feature_dim})")
            entry.put(rows, feats)
            self.images_embedded += len(rows)
            if self.root is not None:
                self._save_shard(key, entry, rows, feats)

    def _refresh(self, key: str, entry: _Entry, backbone: Backbone, split: Split,
                 mode: str) -> None:
        """Read (under the entry's lock) the shards written since we last looked, verifying
        each; delete those that fail and any shard the index does not list."""
        folder = self._dir(key)
        expect = new_index(key, backbone.key, mode, split.key, split.size, backbone.feature_dim)
        doc, dirty = self._read_index(folder, expect)
        size = doc["split_size"]
        for name, rec in list(doc["shards"].items()):
            if name in entry.loaded:
                continue
            shard = folder / f"{name}.safetensors"
            try:
                if not SHARD_NAME.fullmatch(name):
                    raise IntegrityError("its name is not a shard name")
                rows, feats = check_shard(shard, rec, entry=key, dim=backbone.feature_dim,
                                          size=size)
            except IntegrityError as e:
                log.warning(f"feature cache: discarding shard {shard} ({e}); its images are "
                            "embedded again")
                del doc["shards"][name]
                dirty = True
                if SHARD_NAME.fullmatch(name):
                    shard.unlink(missing_ok=True)
                continue
            entry.put(rows, feats)
            entry.loaded.add(name)
        dirty |= self._sweep(folder, doc)
        entry.doc = doc
        if dirty:
            write_json(folder / INDEX, doc)

    def _read_index(self, folder: Path, expect: dict) -> tuple[dict, bool]:
        """The entry's index (fresh if absent or unusable) and whether it must be rewritten."""
        path = folder / INDEX
        if not path.exists():
            return expect, False
        try:
            doc = read_json(path)
            problem = index_problem(doc, expect)
        except IntegrityError as e:
            problem = str(e)
        if problem:
            log.warning(f"feature cache: discarding index {path} ({problem}); the entry's "
                        "images are embedded again")
            return expect, True
        if doc["split_size"] is None and expect["split_size"] is not None:
            return doc | {"split_size": expect["split_size"]}, True
        return doc, False

    @staticmethod
    def _sweep(folder: Path, doc: dict) -> bool:
        """Delete shards the index does not list and temporary files (we hold the lock, so no
        writer is alive); True when any shard went."""
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        strays = [p for p in folder.glob("*.safetensors") if p.stem not in doc["shards"]]
        if strays:
            log.warning(f"feature cache: discarding {len(strays)} shard(s) in {folder} that "
                        f"{INDEX} does not list ({', '.join(p.name for p in strays[:3])}"
                        f"{', ...' if len(strays) > 3 else ''}; left by a run killed while "
                        "writing, or by an older retain); their images are embedded again")
            for p in strays:
                p.unlink(missing_ok=True)
        return bool(strays)

    def _save_shard(self, key: str, entry: _Entry, rows: np.ndarray, feats: torch.Tensor) -> None:
        """The shard first, then the index naming it (each atomically): a kill in between
        leaves a shard the index does not list, which the next reader deletes."""
        from safetensors.torch import save

        folder = self._dir(key)
        name = hashlib.sha256(rows.tobytes()).hexdigest()[:16]
        feats = feats.float().contiguous()
        data = save({"index": torch.from_numpy(rows), "features": feats},
                    metadata={"entry": key})
        sha = write_bytes(folder / f"{name}.safetensors", data)
        assert entry.doc is not None
        entry.doc["shards"][name] = shard_record(sha, rows, feats.shape[1])
        entry.loaded.add(name)
        write_json(folder / INDEX, entry.doc)


# ------------------------------------------------------------------------------------ passes

@torch.no_grad()
def embed_chunks(backbone: Backbone, split: Split, index: np.ndarray, *, chunk: int,
                 device: torch.device | str, batch_size: int = 64, autocast: bool = False,
                 progress: bool = False) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(rows, (n, D) features) for every ``chunk`` of the full-split rows ``index`` of
    ``split``, in order: the frozen backbone's output on those images."""
    pos_of = {int(i): p for p, i in enumerate(split.index)}
    positions = np.array([pos_of[int(i)] for i in index], dtype=np.int64)
    model = backbone.model.to(device).eval()
    device = torch.device(device)
    bar = tqdm(total=len(positions), desc=f"embed {backbone.name}", unit="img",
               disable=not progress, leave=False)
    for c in range(0, len(positions), chunk):
        out = []
        for start in range(c, min(c + chunk, len(positions)), batch_size):
            stop = min(start + batch_size, c + chunk)
            x = backbone.preprocess(split, positions[start:stop]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out.append(model(x).float().cpu())  # (B, D)
            bar.update(len(x))
        yield np.asarray(index[c : c + chunk], dtype=np.int64), torch.cat(out)
    bar.close()


def embed(backbone: Backbone, split: Split, index: np.ndarray, *, device: torch.device | str,
          batch_size: int = 64, autocast: bool = False, progress: bool = False) -> torch.Tensor:
    """Run the frozen backbone on the images of ``split`` whose full-split index is in ``index``."""
    parts = [f for _, f in embed_chunks(backbone, split, index, chunk=max(len(index), 1),
                                        device=device, batch_size=batch_size, autocast=autocast,
                                        progress=progress)]
    return torch.cat(parts) if parts else torch.zeros(0, backbone.feature_dim)
