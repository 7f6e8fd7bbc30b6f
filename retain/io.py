"""Files that are either the old version or the new one, verified when read back, and locks.

Writes go to a temporary file in the same folder, are flushed to disk, given the permissions
any file the user creates gets (``0o666 & ~umask``; ``mkstemp`` alone would leave 0600) and
renamed into place. JSON is written strictly (NaN and infinities become ``null``) so that any
parser reads it. Readers name the file and what is wrong with it in an ``IntegrityError``.
Locks are ``fcntl.flock`` locks on a file that records the holder's pid: the kernel drops them
when the holder dies, so a lock left by a killed process is taken over, never waited on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import stat
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import IntegrityError, RunLockedError

if TYPE_CHECKING:  # torch is imported only by the functions that need it (light CLI start)
    import torch

MAX_HEADER_BYTES = 100 << 20  # a safetensors header larger than this is refused (safetensors' own)


# ------------------------------------------------------------------------------------ writing

def umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc), else by
    setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened/synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically; returns its sha256 (hex)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def strict_json(obj):
    """``obj`` with NaN/inf -> None, numpy scalars and arrays -> Python, tuples -> lists, and
    anything else JSON cannot hold -> its ``str``."""
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):  # arrays and scalars
        return strict_json(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return str(obj)


def dumps(obj) -> bytes:
    """Strict JSON (RFC 8259: no NaN), indented, as bytes."""
    return json.dumps(strict_json(obj), indent=2, allow_nan=False).encode()


def write_json(path: str | Path, obj) -> str:
    """``obj`` as strict JSON, written atomically; returns the file's sha256."""
    return write_bytes(path, dumps(obj))


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> str:
    """A safetensors file, written atomically; returns the file's sha256."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return write_bytes(path, save(tensors, metadata=metadata))


# ------------------------------------------------------------------------------------ reading

def open_regular(path: str | Path):
    """``path`` opened for binary reading, refusing (without blocking) anything but a regular
    file: a FIFO, socket or device named like a data file would otherwise hang or never end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise IntegrityError(f"cannot open {path}: {e.strerror}") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise IntegrityError(f"{path} is not a regular file ({file_kind(mode)}); retain only reads "
                             "regular files: remove or replace it")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path: str | Path, sha256: str | None = None) -> bytes:
    """The bytes of the regular file ``path``; with ``sha256``, checked against it."""
    with open_regular(path) as f:
        data = f.read()
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise IntegrityError(f"{path} has sha256 {got[:16]}..., not the {sha256[:16]}... "
                                 "recorded when it was written: it was altered or damaged")
    return data


def read_json(path: str | Path, sha256: str | None = None):
    """A JSON file (NaN accepted, as older retain wrote it); an ``IntegrityError`` naming the
    file and the position when it is not JSON."""
    data = read_bytes(path, sha256)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise IntegrityError(f"{path} is not UTF-8 text (byte {e.start}): it was damaged") from e
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                             f"{e.msg}): it was damaged or cut short") from e
    except RecursionError as e:
        raise IntegrityError(f"{path} nests too deeply to be a file retain wrote") from e


def safetensors_metadata(data: bytes, name: str | Path = "data") -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (checked to be a mapping of strings)."""
    if len(data) < 8:
        raise IntegrityError(f"{name} is too short to be a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER_BYTES, len(data) - 8):
        raise IntegrityError(f"{name}: safetensors header length {n} is impossible "
                             f"for a {len(data)}-byte file: it was damaged")
    try:
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (ValueError, AttributeError) as e:
        raise IntegrityError(f"{name}: the safetensors header is not a JSON mapping") from e
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise IntegrityError(f"{name}: the safetensors metadata is not a mapping of strings")
    return meta


def load_tensors(data: bytes, name: str | Path = "data") -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes; an ``IntegrityError`` naming ``name`` when malformed."""
    from safetensors.torch import load

    safetensors_metadata(data, name)  # the header length is sane before safetensors reads it
    try:
        return load(data)
    except Exception as e:  # SafetensorError, and whatever a damaged header makes it raise
        raise IntegrityError(f"{name} is not a readable safetensors file ({type(e).__name__}: "
                             f"{str(e)[:200]}): it was damaged or cut short") from e


def read_tensors(path: str | Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file, verified against ``sha256`` when given."""
    return load_tensors(read_bytes(path, sha256), path)


# ------------------------------------------------------------------------------------ locks

def lock_holder(path: Path) -> int | None:
    """The pid written in lock file ``path``, if any."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def lock_busy(path: str | Path) -> int | None:
    """None when no process holds the lock ``path``; else the holder's pid (0: unknown)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError:
        return lock_holder(Path(path)) or 0
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def file_lock(path: str | Path, *, wait: bool, what: str,
              on_wait: Callable[[int | None], None] | None = None,
              on_stale: Callable[[int], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if absent) and write our pid into it.

    ``wait=False``: a ``RunLockedError`` naming ``what`` and the holder's pid when another
    process holds it. ``wait=True``: ``on_wait(holder pid)`` once, then block until it is free.
    ``on_stale(pid)`` is called when the file names a pid that no longer runs (a killed holder;
    the kernel released its lock, which is now ours).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = lock_holder(path)
            if not wait:
                who = f"pid {holder}" if holder else "another process"
                raise RunLockedError(f"{what} is in use by a running retain process ({who}, "
                                     f"lock file {path}); wait for it to finish or stop it, "
                                     "or use another folder") from None
            if on_wait:
                on_wait(holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        previous = lock_holder(path)
        if previous and previous != os.getpid() and on_stale and not pid_alive(previous):
            on_stale(previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
