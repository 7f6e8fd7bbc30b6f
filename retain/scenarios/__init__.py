"""Scenarios: streams of tasks built from a loaded dataset."""

from .base import Task, TaskKind
from .class_incremental import ClassIncremental, class_order_for, parse_notation, task_sizes
from .factory import make_scenario
from .streams import (
    CIFAR100_SUPERCLASSES,
    DomainIncremental,
    PermutedStream,
    RotatedStream,
    TaskIncremental,
    superclass_order,
)
from .task_free import TaskFree

__all__ = ["CIFAR100_SUPERCLASSES", "ClassIncremental", "DomainIncremental", "PermutedStream",
           "RotatedStream", "Task", "TaskFree", "TaskIncremental", "TaskKind", "class_order_for",
           "make_scenario", "parse_notation", "superclass_order", "task_sizes"]
