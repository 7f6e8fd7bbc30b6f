"""Scenario names as written in configs and on the command line.

| name | stream |
|---|---|
| ``B{m}Inc{n}`` | class-incremental: m classes first (0: n), then n per task |
| ``TIL-B{m}Inc{n}`` | the same splits, task id given at test time |
| ``Superclass-CIL`` / ``Superclass-TIL`` | CIFAR-100's 20 superclasses as 20 tasks of 5 classes |
| ``Permuted{n}`` | n permuted-pixel tasks (domain-incremental) |
| ``Rotated{n}`` | n tasks rotated by 0, 360/n, 2*360/n, ... degrees (domain-incremental) |
| ``Domains`` | one task per domain of the dataset (e.g. DomainNet), in its order |
| ``Domains:{a},{b},...`` | the same, domains by name (or id) in the order given |
| ``TaskFree{k}:{name}`` | stream ``name`` learned task-free: unmarked segments of k samples |
| ``TaskFree:{name}`` | the same with segments of 500 samples |
"""

from __future__ import annotations

import re

import numpy as np

from ..datasets.base import DataBundle
from ..errors import ConfigError
from .class_incremental import ClassIncremental, parse_notation
from .streams import (
    DomainIncremental,
    PermutedStream,
    RotatedStream,
    TaskIncremental,
    superclass_order,
)
from .task_free import TaskFree

FORMS = ("B{m}Inc{n}, TIL-B{m}Inc{n}, Superclass-CIL, Superclass-TIL, Permuted{n}, Rotated{n}, "
         "Domains, Domains:{a},{b},..., TaskFree{k}:{any of these}")
SEGMENT = 500  # default task-free segment (samples per learn call)


def make_scenario(bundle: DataBundle, name: str, seed: int | None = 1993):
    """The scenario ``name`` (see the module table) over ``bundle``."""
    if m := re.fullmatch(r"TaskFree(\d*):(.+)", name):
        inner = make_scenario(bundle, m.group(2), seed)
        return TaskFree(inner, int(m.group(1) or SEGMENT), seed)
    if name.startswith("TaskFree"):
        raise ConfigError(f"task-free scenario {name!r}: write TaskFree{{k}}:{{stream}}, e.g. "
                          f"TaskFree500:Permuted5 (segments of 500 samples)")
    if name.startswith("TIL-"):
        m, n = parse_notation(name[4:])
        return TaskIncremental(bundle, increment=n, initial_increment=m, seed=seed)
    if name in ("Superclass-CIL", "Superclass-TIL"):
        cls = TaskIncremental if name.endswith("TIL") else ClassIncremental
        order = superclass_order(bundle.class_names, seed)
        return cls(bundle, increment=5, class_order=order, seed=seed)
    if m := re.fullmatch(r"Permuted(\d+)", name):
        return PermutedStream(bundle, int(m.group(1)), seed=seed or 0)
    if m := re.fullmatch(r"Rotated(\d+)", name):
        n = int(m.group(1))
        return RotatedStream(bundle, list(np.arange(n) * 360.0 / max(n, 1)))
    if name == "Domains" or name.startswith("Domains:"):
        order = [d.strip() for d in name[8:].split(",")] if ":" in name else None
        return DomainIncremental(bundle, order)
    if name.startswith("B"):
        return ClassIncremental.from_notation(bundle, name, seed=seed)
    raise ConfigError(f"unknown scenario {name!r}; use one of: {FORMS}")
