"""Atomic writes: a results file or checkpoint is either the old one or the new one, never half."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj) -> None:
    _atomic(Path(path), lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(Path(path), lambda f: f.write(data))


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, written to a temporary name and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
