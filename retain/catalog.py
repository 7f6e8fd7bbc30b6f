"""What retain offers, readable in milliseconds: methods (paper, tags, typed hyper-parameters
with defaults, ranges and meanings), backbones (their specs) and datasets, without importing
torch.

The facts live in the code; ``catalog.json`` beside this file is a copy of them made by
``python -m retain.catalog`` from the imported registries. It records the sha256 of every source
file it was read from: where one differs (a method was edited and the file not regenerated) the
catalog is built from the code again, which is slower but never wrong, and a one-line note says
how to regenerate it; ``tests/test_catalog.py`` fails until it is regenerated.

The meaning of a hyper-parameter is the comment on its ``self.NAME = NAME  # ...`` line in the
method's ``__init__`` (or a base class's), else the shared one-liner in ``GLOSSARY``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
FILE = ROOT / "catalog.json"
SOURCE_FOLDERS = ("methods", "backbones", "datasets")
FORMAT = 1

# meanings of hyper-parameters that many methods share (a method's own comment wins)
GLOSSARY = {
    "epochs": "passes over each task's training data",
    "lr": "learning rate",
    "batch_size": "training batch size",
    "weight_decay": "weight decay (L2) of the optimiser",
    "momentum": "SGD momentum",
    "augment": "random crop and flip of training images",
    "freeze_backbone": "train the head only, on cached frozen features",
    "clip_grad": "clip the global gradient norm to this (None: no clipping)",
    "min_lr": "floor of the learning-rate schedule",
    "warmup_lr": "learning rate at the start of the warm-up",
    "lr_decay": "learning-rate decay factor",
    "cov_eps": "added to the diagonal of class covariances (numerical floor)",
    "mlp_ratio": "MLP width as a multiple of the token width",
    "num_heads": "attention heads",
    "kd_weight": "weight of the knowledge-distillation term",
    "temperature": "softmax temperature",
    "memory_per_class": "memory_size counts exemplars per class (else in total)",
    "batchwise_prompt": "the reference code's batch-wise prompt vote (uses batch information)",
    "adapter_bottleneck": "hidden width of each adapter",
    "prompt_length": "tokens per prompt",
    "peft": "what first-session adaptation tunes: finetune (all weights) or a PEFT module",
}


def sources() -> dict[str, str]:
    """Relative path -> sha256 (16 hex digits) of every file the catalog is read from."""
    files = sorted(p for folder in SOURCE_FOLDERS for p in (ROOT / folder).glob("*.py"))
    return {p.relative_to(ROOT).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in files}


@functools.cache
def load() -> dict[str, Any]:
    """The catalog: from ``catalog.json`` when it matches the sources, else built from the
    code (slower: imports torch), with a note on stderr."""
    try:
        data = json.loads(FILE.read_text())
    except (OSError, ValueError):
        data = None
    if data is not None and data.get("format") == FORMAT and data.get("sources") == sources():
        return data
    changed = sorted(set((data or {}).get("sources", {}).items()) ^ set(sources().items()))
    print(f"note: {FILE.name} is out of date ({', '.join(sorted({c[0] for c in changed}))}); "
          "reading the code instead. Regenerate it: python -m retain.catalog", file=sys.stderr)
    return build()


def methods() -> dict[str, dict]:
    return load()["methods"]


def backbones() -> dict[str, dict]:
    return load()["backbones"]


def datasets() -> dict[str, dict]:
    return load()["datasets"]


def param_table(method: str) -> dict[str, tuple[Any, Any]]:
    """name -> (annotation, default) of ``method``'s hyper-parameters, as ``params.specs``."""
    from . import params as P

    return {p["name"]: (P.annotation(p["type"]), p["default"])
            for p in methods()[method]["params"]}


def default_needs(method: str) -> list:
    """What ``method`` needs with its default hyper-parameters (``retain.specs.Needs``)."""
    from .specs import needs_from_dict

    return [needs_from_dict(d) for d in methods()[method]["needs"]]


def constraints(method: str) -> dict:
    from .params import Interval

    return {p["name"]: Interval(*p["range"]) for p in methods()[method]["params"] if p["range"]}


# ------------------------------------------------------------------------------ building


def build() -> dict[str, Any]:
    """The catalog, read from the imported registries (imports torch and every method)."""
    from .backbones import BACKBONES, SPECS
    from .datasets import DATASETS
    from .methods import METHODS

    return {"format": FORMAT, "sources": sources(),
            "methods": {n: method_entry(METHODS.get(n)) for n in METHODS.names()},
            "backbones": {n: {"summary": _first_line(BACKBONES.get(n).__doc__),
                              "spec": SPECS[n].to_dict() if n in SPECS else None}
                          for n in BACKBONES.names()},
            "datasets": {n: {"classes": DATASETS.get(n).num_classes,
                             "summary": DATASETS.get(n).description} for n in DATASETS.names()}}


def method_entry(cls: type) -> dict[str, Any]:
    from . import params as P
    from .backbones import SPECS
    from .errors import ConfigError
    from .methods.base import check_needs
    from .specs import needs_to_dict

    table = P.specs(cls)
    defaults = {n: d for n, (_, d) in table.items()}
    runs = {}
    for name, spec in SPECS.items():
        try:
            check_needs(cls.name, defaults, name, spec)
            runs[name] = None
        except ConfigError as e:
            runs[name] = str(e)
    return {"paper": cls.paper, "summary": _first_paragraph(sys.modules[cls.__module__].__doc__),
            "tags": sorted(cls.tags), "module": cls.__module__,
            "params": [{"name": n, "type": P.type_text(t), "default": _jsonable(d),
                        "range": _interval(cls.constraints.get(n)), "help": meaning(cls, n)}
                       for n, (t, d) in table.items()],
            "needs": [needs_to_dict(n) for n in cls.requirements(defaults)],
            "with_defaults_on": runs}


def meaning(cls: type, name: str) -> str:
    """The comment on ``self.NAME = NAME`` in ``cls``'s (or a base's) ``__init__``, or the
    GLOSSARY line; empty when neither says anything."""
    pattern = re.compile(rf"^\s*self\.{re.escape(name)}\s*=\s*{re.escape(name)}\s*#\s*(.+)$",
                         re.M)
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and klass.__module__.startswith("retain."):
            m = pattern.search(_init_source(klass))
            if m:
                return m.group(1).strip()
    return GLOSSARY.get(name, "")


@functools.cache
def _init_source(klass: type) -> str:
    import inspect

    return inspect.getsource(klass.__init__)


def _interval(interval) -> list | None:
    return None if interval is None else [interval.low, interval.high, interval.closed]


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0].strip()


def _first_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def write() -> Path:
    FILE.write_text(_dump(build()) + "\n")
    return FILE


def _dump(obj: Any, indent: int = 0) -> str:
    """JSON with one line per entry that fits in 100 columns (small diffs, easy merges)."""
    flat = json.dumps(obj, ensure_ascii=False)
    if not isinstance(obj, dict | list) or len(flat) + indent <= 100 or not obj:
        return flat
    pad = " " * (indent + 1)
    if isinstance(obj, list):
        items = [pad + _dump(v, indent + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "]"
    items = [f"{pad}{json.dumps(k)}: {_dump(v, indent + 1)}" for k, v in obj.items()]
    return "{\n" + ",\n".join(items) + "}"


if __name__ == "__main__":  # python -m retain.catalog
    print(f"written {write()}")
