"""The ``Task``: one step of a continual stream, carrying every fact a method may use.

A task knows its id, the classes it contains, which of them are new, and every class seen so far;
nothing about the future. ``kind`` says what is known at test time: in a "class" stream the
task id is not given, in a "task" stream it is (and predictions may be restricted to the task's
classes), in a "domain" stream the label space is shared by every task. A ``free`` task is a
segment of a task-free stream (``retain.scenarios.task_free``): no task boundary is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..datasets.base import Split

TaskKind = Literal["class", "task", "domain"]


@dataclass(frozen=True)
class Task:
    """One task. Labels in ``train``/``test`` are already in the stream's label space."""

    id: int
    classes: tuple[int, ...]  # labels present in this task
    new_classes: tuple[int, ...]  # labels first seen in this task
    seen_classes: tuple[int, ...]  # every label seen up to and including this task
    train: Split
    test: Split
    kind: TaskKind = "class"
    class_names: tuple[str, ...] = ()  # the name of every label seen so far (label i: [i])
    free: bool = False  # a segment of a task-free stream: id counts segments, no boundary given

    @property
    def num_seen(self) -> int:
        return len(self.seen_classes)

    def __repr__(self) -> str:
        free = ", free" if self.free else ""
        return (f"Task(id={self.id}, kind={self.kind!r}{free}, classes={len(self.classes)} "
                f"({len(self.new_classes)} new), seen={self.num_seen}, train={len(self.train)}, "
                f"test={len(self.test)})")
