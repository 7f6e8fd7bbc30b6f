"""The same tasks in another order (APD's order robustness; Yoon et al., ICLR 2020, §4.3).

A task order is written as a letter ``A``-``E`` (the five official orders of APD's
``cifar100_apd_run.py``) or as an explicit permutation of the task indices (``"2,0,1,4,3"``).

* Letters name *fixed* class blocks, whatever the run seed: on the superclass streams the 20
  CIFAR-100 superclasses numbered as CIFAR's coarse labels; on the other class splits the blocks
  of consecutive dataset label ids (block k = labels k·n .. k·n+n-1, n the task size), and with
  fewer than 10 blocks the official Split orders restricted to blocks 0..n-1 (relative order
  kept; for 5 blocks: A 01234, B 14203, C 01432, D 20431, E 24013).
* An explicit permutation reorders the tasks of the scenario as built (seeded class order).

Only class splits with equal task sizes can be reordered (a B{m}Inc{n} stream with m ≠ n
cannot); domain streams are not reordered.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError
from .class_incremental import ClassIncremental
from .streams import CIFAR100_SUPERCLASSES

SPLIT_ORDERS = {"A": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], "B": [1, 7, 4, 5, 2, 0, 8, 6, 9, 3],
                "C": [7, 0, 5, 1, 8, 4, 3, 6, 2, 9], "D": [5, 8, 2, 9, 0, 4, 3, 7, 6, 1],
                "E": [2, 9, 5, 4, 8, 0, 6, 1, 3, 7]}
SUPERCLASS_ORDERS = {
    "A": list(range(20)),
    "B": [15, 12, 5, 9, 7, 16, 18, 17, 1, 0, 3, 8, 11, 14, 10, 6, 2, 4, 13, 19],
    "C": [17, 1, 19, 18, 12, 7, 6, 0, 11, 15, 10, 5, 13, 3, 9, 16, 4, 14, 2, 8],
    "D": [11, 9, 6, 5, 12, 4, 0, 10, 13, 7, 14, 3, 15, 16, 8, 1, 2, 19, 18, 17],
    "E": [6, 14, 0, 11, 12, 17, 13, 4, 9, 1, 7, 19, 8, 10, 3, 15, 18, 5, 2, 16]}


def with_task_order(scenario, spec: str):
    """``scenario`` with its tasks in the order ``spec`` (a letter A-E or "i,j,k,...")."""
    if not isinstance(scenario, ClassIncremental):
        raise ConfigError(f"task_order applies to class splits, not to a {scenario.kind} "
                          f"stream of {type(scenario).__name__}")
    if len(set(scenario.sizes)) != 1:
        raise ConfigError(f"task_order needs tasks of equal size; this stream has sizes "
                          f"{scenario.sizes} (use B0Inc{{n}})")
    spec = spec.strip()
    if spec.upper() in SPLIT_ORDERS:
        blocks, order = official_blocks(scenario, spec.upper())
    else:
        blocks, order = own_blocks(scenario), parse_order(spec, len(scenario))
    class_order = np.concatenate([blocks[k] for k in order])
    return type(scenario)(scenario.bundle, increment=scenario.increment,
                          initial_increment=scenario.initial_increment,
                          class_order=class_order, seed=scenario.seed)


def own_blocks(scenario: ClassIncremental) -> list[np.ndarray]:
    """The dataset class ids of each task of ``scenario`` as built."""
    ends = np.cumsum(scenario.sizes)
    return np.split(scenario.class_order, ends[:-1])


def official_blocks(scenario: ClassIncremental, letter: str
                    ) -> tuple[list[np.ndarray], list[int]]:
    """APD's fixed blocks for this stream and the order named ``letter``."""
    names = scenario.bundle.class_names
    size, n = scenario.sizes[0], len(scenario)
    groups = list(CIFAR100_SUPERCLASSES.values())
    if size == 5 and n == 20 and set(names) >= {c for g in groups for c in g}:
        index = {c: i for i, c in enumerate(names)}
        return [np.array([index[c] for c in g]) for g in groups], SUPERCLASS_ORDERS[letter]
    if n > len(SPLIT_ORDERS[letter]):
        raise ConfigError(f"the official orders cover at most 10 tasks (20 on the CIFAR-100 "
                          f"superclasses); this stream has {n}: give an explicit order")
    blocks = [np.arange(k * size, (k + 1) * size) for k in range(n)]
    return blocks, [k for k in SPLIT_ORDERS[letter] if k < n]


def parse_order(spec: str | Sequence[int], n: int) -> list[int]:
    """"2,0,1" -> [2, 0, 1], checked to be a permutation of 0..n-1."""
    try:
        order = [int(k) for k in (spec.split(",") if isinstance(spec, str) else spec)]
    except ValueError:
        raise ConfigError(f"task_order {spec!r}: give a letter A-E or task indices such as "
                          f"'1,0,2'") from None
    if sorted(order) != list(range(n)):
        raise ConfigError(f"task_order {spec!r} must be a permutation of 0..{n - 1}")
    return order
