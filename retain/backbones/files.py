"""Weights files read by retain itself, never by code that a file could smuggle in.

``read_state(path, name)`` returns a flat ``{name: tensor}`` state dict from
- ``.safetensors`` (parsed by safetensors: no code at all);
- PyTorch pickles (``.pth``, ``.bin``, ``.pt``): ``torch.load(weights_only=True)``, which
  rebuilds only tensors and plain containers (the default since torch 2.6, required by
  ``pyproject.toml``; passed explicitly all the same);
- TorchScript archives (OpenAI's CLIP ``.pt``): ``data.pkl`` is read by an unpickler that
  builds only tensors, ordered dicts and inert placeholders for the archive's module classes;
  which attributes are parameters or buffers is read from the ``__parameters__`` and
  ``__buffers__`` lines of the archive's code, which is parsed as text and never run.
``npz_bytes(path)`` returns a NumPy ``.npz`` checked to hold no pickled objects.
Training checkpoints are unwrapped as timm does (EMA weights first, then ``state_dict``,
``model``) and a ``module.`` prefix (DataParallel) is removed.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..errors import RetainError, WeightsError

WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")
STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16,
                  "BFloat16Storage": torch.bfloat16, "DoubleStorage": torch.float64,
                  "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8,
                  "ByteStorage": torch.uint8, "BoolStorage": torch.bool}
# TorchScript's typed containers: each builds a plain list (or tags a value with its type)
JIT_LIST_BUILDERS = {"build_intlist", "build_doublelist", "build_boollist", "build_tensorlist",
                     "build_genericlist", "restore_type_tag"}
MEMBERS = re.compile(r"^\s+__(parameters|buffers)__ = \[(.*)\]\s*$")
CLASS = re.compile(r"^class (\w+)\(Module\):\s*$")


def read_state(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of the weights file ``path`` (for backbone ``name``), loaded without running
    anything the file contains; a ``WeightsError`` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file for {name} not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from ..io import read_tensors

            state = read_tensors(path)
        elif is_torchscript(path):
            state = read_torchscript(path)
        else:
            state = _torch_load(path)
    except RetainError as e:
        raise WeightsError(f"{name}: {e}") from e
    return unwrap(state, path)


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path} holds objects other than tensors, which retain does not "
                           f"load (torch.load weights_only: {str(e).splitlines()[0][:160]}); "
                           "save the state dict or a .safetensors file instead") from e
    except Exception as e:  # zip, EOF and format errors of a damaged file
        raise WeightsError(f"{path} is not a readable PyTorch weights file "
                           f"({type(e).__name__}: {str(e)[:160]})") from e


def unwrap(state, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a training checkpoint, without a ``module.`` prefix."""
    if isinstance(state, dict):
        for key in WRAPPERS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{path} holds no state dict of tensors")
    out = {str(k).removeprefix("module."): v for k, v in state.items()
           if isinstance(v, torch.Tensor)}
    if not out:
        raise WeightsError(f"{path} holds no tensors")
    return out


def npz_bytes(path: str | Path, name: str) -> io.BytesIO:
    """The bytes of a NumPy ``.npz`` checkpoint, checked to hold only plain arrays (no pickled
    objects), to hand to timm's converter as an in-memory file."""
    from ..io import read_bytes

    try:
        data = read_bytes(path)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for key in npz.files:
                npz[key]  # raises on an object array
    except (RetainError, ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise WeightsError(f"{name}: {path} is not a NumPy .npz of plain arrays ({e})") from e
    return io.BytesIO(data)


# ------------------------------------------------------------------------------- TorchScript

def is_torchscript(path: Path) -> bool:
    return zipfile.is_zipfile(path) and any(
        n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist())


def _same(value, _type_tag=None):
    return value


class _Module:
    """An inert stand-in for a TorchScript module object: its attributes, nothing else."""

    qualname = ""

    def __setstate__(self, state):
        self.attrs = state if isinstance(state, dict) else {}


class _TensorsOnly(pickle.Unpickler):
    """Builds tensors (storages read from the archive), ordered dicts and ``_Module``s only."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.classes = archive, prefix, {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch.jit._pickle" and name in JIT_LIST_BUILDERS:
            return _same if name == "restore_type_tag" else list
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if module == "__torch__" or module.startswith("__torch__."):
            qual = f"{module}.{name}"
            return self.classes.setdefault(qual, type(name, (_Module,), {"qualname": qual}))
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype) and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f"refused persistent id {str(pid)[:80]}")
        raw = bytearray(self.archive.read(f"{self.prefix}data/{pid[2]}"))
        flat = torch.frombuffer(raw, dtype=pid[1]) if raw else torch.zeros(0, dtype=pid[1])
        return torch.storage.TypedStorage(wrap_storage=flat.untyped_storage(), dtype=pid[1],
                                          _internal=True)


def read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a TorchScript archive, with their state-dict names."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next(n for n in z.namelist() if n.endswith("data.pkl") and n.count("/") == 1)
            prefix = pkl[: -len("data.pkl")]
            members = _members(z, prefix)
            root = _TensorsOnly(z.read(pkl), z, prefix).load()
    except (StopIteration, KeyError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError,
            ValueError, TypeError, RuntimeError) as e:
        raise WeightsError(f"{path}: not a TorchScript archive of weights that retain can read "
                           f"without running it ({type(e).__name__}: {str(e)[:160]})") from e
    state: dict[str, torch.Tensor] = {}
    _collect(root, "", members, state, path)
    return state


def _members(z: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """{module class qualname: its parameter and buffer names}, from the archive's code text."""
    out: dict[str, set[str]] = {}
    for file in z.namelist():
        if not (file.startswith(f"{prefix}code/") and file.endswith(".py")):
            continue
        module = file[len(f"{prefix}code/"): -3].replace("/", ".")
        current = None
        for line in z.read(file).decode("utf-8", "replace").splitlines():
            if m := CLASS.match(line):
                current = out.setdefault(f"{module}.{m.group(1)}", set())
            elif (m := MEMBERS.match(line)) and current is not None:
                current.update(re.findall(r'"([^"]+)"', m.group(2)))
    return out


def _collect(obj, prefix: str, members: dict[str, set[str]], state: dict, path: Path) -> None:
    if not isinstance(obj, _Module):
        raise WeightsError(f"{path}: the archive's root is not a module")
    if obj.qualname not in members:
        raise WeightsError(f"{path}: no declaration of {obj.qualname} in the archive's code")
    for name, value in getattr(obj, "attrs", {}).items():
        if isinstance(value, _Module):
            _collect(value, f"{prefix}{name}.", members, state, path)
        elif isinstance(value, torch.Tensor) and name in members[obj.qualname]:
            state[f"{prefix}{name}"] = value
