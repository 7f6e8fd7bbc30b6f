"""Scenarios: streams of tasks built from a loaded dataset."""

from .base import Task, TaskKind
from .class_incremental import ClassIncremental, class_order_for, parse_notation, task_sizes

__all__ = ["ClassIncremental", "Task", "TaskKind", "class_order_for", "parse_notation",
           "task_sizes"]
