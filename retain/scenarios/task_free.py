"""Task-free streams: the same data, handed to the learner in unmarked segments.

``TaskFree(inner, segment)`` cuts the training data of every task of ``inner`` into segments of
``segment`` samples (shuffled within the task, seeded; the last segment of a task may be
shorter) and hands them to the method one ``learn`` call each. Nothing marks where a task ends:
a segment's ``id`` counts segments, ``free`` is set, its test split is empty, ``classes`` are
the labels present in it and ``seen_classes`` every label up to the largest observed so far.
A segment never straddles two tasks, so the evaluator (which knows the tasks) measures the
accuracy matrix at the true boundaries, as in SupSup's NNs setting (Wortsman et al., 2020, §3.5)
and Avalanche's online streams (``split_online_stream`` without ``access_task_boundaries``).

Indexing and iteration give the *inner* tasks (what evaluation needs); ``segments(t)`` gives
what the learner sees during task ``t``. Only methods tagged ``task_free`` may learn such a
stream (the runner refuses the others: a per-task module would grow once per segment).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from ..errors import ConfigError
from .base import Task


class TaskFree:
    """``inner``'s tasks, learned as unmarked segments of ``segment`` training samples."""

    def __init__(self, inner, segment: int, seed: int | None = 1993):
        if segment < 1:
            raise ConfigError(f"a task-free segment needs at least 1 sample, not {segment}")
        self.inner = inner
        self.segment = segment
        self.seed = 0 if seed is None else seed
        self._counts: list[int] = []  # segments per task, filled on first use

    kind = property(lambda self: self.inner.kind)
    bundle = property(lambda self: self.inner.bundle)
    class_order = property(lambda self: self.inner.class_order)
    class_names = property(lambda self: self.inner.class_names)
    sizes = property(lambda self: self.inner.sizes)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.inner)

    def __getitem__(self, key: int | slice) -> Task | list[Task]:
        return self.inner[key]

    def num_segments(self, t: int) -> int:
        """How many segments task ``t`` is cut into."""
        while len(self._counts) <= t:
            n = len(self.inner[len(self._counts)].train)
            self._counts.append(math.ceil(n / self.segment))
        return self._counts[t]

    def first_segment(self, t: int) -> int:
        """The id of task ``t``'s first segment."""
        return sum(self.num_segments(k) for k in range(t))

    def task_of(self, segments: np.ndarray) -> np.ndarray:
        """(N,) segment ids -> (N,) the task each segment belongs to."""
        ends = np.cumsum([self.num_segments(k) for k in range(len(self))])  # (T,)
        return np.searchsorted(ends, np.asarray(segments), side="right")

    def segments(self, t: int) -> list[Task]:
        """What the learner sees during task ``t``, in order."""
        return self.segments_of(self.inner[t])

    def segments_of(self, task: Task) -> list[Task]:
        """The segments of ``task`` (one of ``self[t]``, already built)."""
        t = task.id
        order = np.random.RandomState([self.seed % 2**32, t]).permutation(len(task.train))
        observed = set(task.seen_classes) - set(task.new_classes)  # labels of earlier tasks
        empty = task.test.subset(np.zeros(0, dtype=np.int64))
        out, first = [], self.first_segment(t)
        for k, start in enumerate(range(0, len(order), self.segment)):
            train = task.train.subset(order[start : start + self.segment])
            present = {int(c) for c in np.unique(train.targets)}
            new, observed = present - observed, observed | present
            seen = tuple(range(max(observed) + 1))
            out.append(Task(first + k, tuple(sorted(present)), tuple(sorted(new)), seen, train,
                            empty, kind=task.kind, class_names=task.class_names[: len(seen)],
                            free=True))
        return out
