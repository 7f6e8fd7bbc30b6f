"""The versioned state of a served model on disk.

    STATE/server.json              what rebuilds the method (written once, see model.Spec)
    STATE/versions/v0001/          one folder per version: state.safetensors + version.json
    STATE/versions/.v0002.*.tmp/   a version being written (ignored, removed at the next start)
    STATE/store/                   images a memory method refers to (exemplar paths), if any
    STATE/jobs/<id>/               the images of a learn job until it ends
    STATE/lock                     held (flock) by the one server that uses the folder

A version is written into a hidden temporary folder (the state through ``retain.io``: the same
safetensors + JSON as run checkpoints, each file fsynced), the folder is fsynced, then renamed to
``vNNNN`` in one step, so a reader sees a version completely or not at all. ``version.json``
carries the sha256 and size of its state file; a version is *complete* when both files are
there and the size matches, and its hash is verified whenever its state is read. The version
served is always the highest-numbered complete one: a rollback writes a new version holding the
state of an older one, so every change is one rename and a restart after ``kill -9`` at any
moment serves the last version that was completely written.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path

import torch

from ..backbones.base import sha256_file
from ..errors import ServeError
from ..io import read_json, read_tensors, write_json, write_tensors

VERSION = re.compile(r"^v(\d{4,})$")
TEMP = re.compile(r"^\.v(\d{4,})\..*\.tmp$")
STATE, META = "state.safetensors", "version.json"


class VersionStore:
    """The versions under ``root``/versions; see the module docstring for the layout."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.versions = self.root / "versions"
        self._lock_fd: int | None = None

    # -- the folder ---------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return (self.root / "server.json").is_file()

    def spec(self) -> dict:
        return read_json(self.root / "server.json")

    def initialise(self, spec: dict) -> None:
        """Write server.json (once: a folder never changes what it serves)."""
        write_json(self.root / "server.json", spec)
        self.versions.mkdir(parents=True, exist_ok=True)

    def lock(self) -> None:
        """Hold the folder for this process (released when it exits, even by kill -9)."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ServeError(409, f"another server is using {self.root}; stop it or pass "
                                  f"another --state folder") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def clean(self) -> list[str]:
        """Remove what an interrupted learn left behind (temporary versions, job folders);
        call only while holding the lock. Returns the names removed."""
        removed = []
        for p in list(self.versions.glob(".v*.tmp")) + list((self.root / "jobs").glob("*")):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        return removed

    # -- versions -----------------------------------------------------------------------------
    def numbers(self) -> list[int]:
        """Numbers of the complete versions, ascending."""
        out = []
        for p in self.versions.glob("v*") if self.versions.is_dir() else []:
            m = VERSION.match(p.name)
            if m and self._complete(p):
                out.append(int(m.group(1)))
        return sorted(out)

    def _complete(self, folder: Path) -> bool:
        try:
            meta = read_json(folder / META)
            return (folder / STATE).stat().st_size == meta["bytes"]
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def latest(self) -> int | None:
        nums = self.numbers()
        return nums[-1] if nums else None

    def next_number(self) -> int:
        """One above every version folder, complete or not (a number is never reused)."""
        seen = [0]
        for p in self.versions.glob("*") if self.versions.is_dir() else []:
            m = VERSION.match(p.name) or TEMP.match(p.name)
            if m:
                seen.append(int(m.group(1)))
        return max(seen) + 1

    def folder(self, v: int) -> Path:
        return self.versions / f"v{v:04d}"

    def meta(self, v: int) -> dict:
        if v not in self.numbers():
            raise ServeError(404, f"no version {v}; versions: {self.numbers()}")
        return read_json(self.folder(v) / META)

    def read(self, v: int) -> tuple[dict[str, torch.Tensor], dict]:
        """The state and metadata of version ``v``, its state file verified against its hash."""
        meta = self.meta(v)
        path = self.folder(v) / STATE
        digest = sha256_file(path)
        if digest != meta["sha256"]:
            raise ServeError(500, f"{path} does not match its recorded sha256 "
                                  f"({digest[:12]} != {meta['sha256'][:12]}); the version is "
                                  f"damaged: roll back to another one")
        return read_tensors(path), meta

    def write(self, v: int, state: dict[str, torch.Tensor], meta: dict,
              hook=None) -> dict:
        """Write version ``v`` atomically; returns its metadata (with time, hash and size).
        ``hook`` (tests) is called after the files are written and before the rename."""
        return self._publish(v, meta, lambda tmp: write_tensors(
            tmp / STATE, state, metadata={"version": str(v)}), hook)

    def copy(self, v: int, source: int, meta: dict) -> dict:
        """Write version ``v`` holding the state of version ``source`` (a rollback)."""
        self.read(source)  # verified before it is copied
        return self._publish(v, meta, lambda tmp: shutil.copyfile(
            self.folder(source) / STATE, tmp / STATE), None)

    def _publish(self, v: int, meta: dict, write_state, hook) -> dict:
        target = self.folder(v)
        if target.exists():
            raise ServeError(409, f"version {v} already exists")
        self.versions.mkdir(parents=True, exist_ok=True)
        tmp = self.versions / f".v{v:04d}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        try:
            write_state(tmp)
            _fsync(tmp / STATE)
            meta = {**meta, "version": v, "sha256": sha256_file(tmp / STATE),
                    "bytes": (tmp / STATE).stat().st_size,
                    "time": meta.get("time") or time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                              time.gmtime())}
            write_json(tmp / META, meta)
            _fsync(tmp)
            if hook is not None:
                hook()
            os.rename(tmp, target)  # fails if the target appeared meanwhile: never overwrites
            _fsync(self.versions)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return meta

    def delete(self, v: int) -> None:
        """Remove an older version (never the one served)."""
        if v not in self.numbers():
            raise ServeError(404, f"no version {v}; versions: {self.numbers()}")
        if v == self.latest():
            raise ServeError(409, f"version {v} is the one served; roll back to another "
                                  f"version first")
        gone = self.versions / f".v{v:04d}.deleted.tmp"
        os.rename(self.folder(v), gone)  # disappears from the listing in one step
        shutil.rmtree(gone, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
