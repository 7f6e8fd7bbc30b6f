"""Class-incremental streams in the B{m}Inc{n} notation (Rebuffi et al., iCaRL, CVPR 2017).

B{m}Inc{n}: the first task holds m classes (m = 0 means n), every later task n new classes; a
remainder forms a last, smaller task, as LAMDA-PILOT's ``DataManager`` does. The class order is
``np.random.RandomState(seed).permutation(num_classes)`` (seed 1993 following iCaRL/PyCIL), and
labels are remapped to their position in that order, so task t owns a contiguous label range.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np

from ..datasets.base import DataBundle, Split
from ..errors import ConfigError
from .base import Task

NOTATION = re.compile(r"^B(\d+)Inc(\d+)$")


def parse_notation(text: str) -> tuple[int, int]:
    """'B0Inc10' -> (initial_increment=0, increment=10)."""
    match = NOTATION.match(text.strip())
    if not match or int(match.group(2)) == 0:
        raise ConfigError(f"scenario {text!r} is not of the form B{{m}}Inc{{n}} with n > 0 "
                          "(e.g. B0Inc10: 10 new classes per task; B50Inc10: 50, then 10 per task)")
    return int(match.group(1)), int(match.group(2))


def class_order_for(num_classes: int, seed: int | None) -> np.ndarray:
    """The anchors' class order: RandomState(seed).permutation; natural order when seed is None."""
    if seed is None:
        return np.arange(num_classes)
    return np.random.RandomState(seed).permutation(num_classes)


def task_sizes(num_classes: int, initial_increment: int, increment: int) -> list[int]:
    """[m] + [n] * k (+ remainder), as PILOT's DataManager; m = 0 means a first task of n."""
    first = initial_increment or increment
    if first > num_classes:
        raise ConfigError(f"first task of {first} classes, but the dataset has {num_classes}")
    sizes = [first]
    while sum(sizes) < num_classes:
        sizes.append(min(increment, num_classes - sum(sizes)))
    return sizes


class ClassIncremental:
    """A class-incremental scenario over a loaded dataset: ``len``, indexing, slicing, iteration.

    >>> scenario = ClassIncremental(bundle, increment=10)            # B0Inc10
    >>> for task in scenario: ...                                     # re-entrant
    """

    kind = "class"

    def __init__(self, bundle: DataBundle, increment: int, initial_increment: int = 0,
                 class_order: Sequence[int] | None = None, seed: int | None = 1993):
        if increment <= 0 or initial_increment < 0:
            raise ConfigError("increment must be > 0 and initial_increment >= 0")
        self.bundle = bundle
        self.increment = increment
        self.initial_increment = initial_increment
        self.seed = seed
        c = bundle.num_classes
        order = class_order_for(c, seed) if class_order is None else np.asarray(class_order)
        if sorted(order.tolist()) != list(range(c)):
            raise ConfigError(f"class_order must be a permutation of 0..{c - 1}")
        self.class_order = order.astype(np.int64)
        self.sizes = task_sizes(c, initial_increment, increment)
        self._remap = np.empty(c, dtype=np.int64)
        self._remap[self.class_order] = np.arange(c)

    @classmethod
    def from_notation(cls, bundle: DataBundle, notation: str, seed: int | None = 1993,
                      class_order: Sequence[int] | None = None) -> ClassIncremental:
        m, n = parse_notation(notation)
        return cls(bundle, increment=n, initial_increment=m, class_order=class_order, seed=seed)

    @property
    def notation(self) -> str:
        return f"B{self.initial_increment}Inc{self.increment}"

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names in the stream's label order (label i is ``class_names[i]``)."""
        return tuple(self.bundle.class_names[i] for i in self.class_order)

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self) -> Iterator[Task]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, key: int | slice) -> Task | list[Task]:
        if isinstance(key, slice):
            return [self[i] for i in range(*key.indices(len(self)))]
        if not -len(self) <= key < len(self):
            raise IndexError(f"task {key} out of range for {len(self)} tasks")
        return self._task(key % len(self))

    def _task(self, t: int) -> Task:
        lo, hi = sum(self.sizes[:t]), sum(self.sizes[: t + 1])
        classes = tuple(range(lo, hi))
        return Task(id=t, classes=classes, new_classes=classes, seen_classes=tuple(range(hi)),
                    train=self._select(self.bundle.train, lo, hi),
                    test=self._select(self.bundle.test, lo, hi), kind="class",
                    class_names=self.class_names[:hi])

    def _select(self, split: Split, lo: int, hi: int) -> Split:
        labels = self._remap[split.targets]  # (N,) stream labels
        positions = np.flatnonzero((labels >= lo) & (labels < hi))
        return split.subset(positions).relabel(labels[positions])
