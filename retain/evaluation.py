"""Evaluation as a function: after a stage, count correct predictions on every seen task.

The test samples of the seen tasks are concatenated and presented in a shuffled order (seeded by
the run seed and the stage), so no method can profit from class-ordered batches (pitfall §1.2);
predictions are mapped back before counting. In a task-incremental stream the prediction of a
sample is restricted to its task's classes (task-IL accuracy, as Mammoth's ``mask_classes``).
Only methods tagged ``needs_task_id_at_test`` ever receive task ids (in any stream: SupSup GG and
DEN on permuted tasks are evaluated with the task given, and their results carry that tag); no
other method sees a task id at test time. Tasks whose test images differ in content (domain
streams) are predicted group by group, so cached features of each task's images are reused.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .context import Context
from .datasets.base import Split
from .methods.base import TASK_ID_AT_TEST, Method
from .scenarios.base import Task


def evaluate(method: Method, tasks: list[Task], ctx: Context, stage: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """(correct, total) per task in ``tasks`` (the tasks seen so far) after stage ``stage``."""
    correct = np.zeros(len(tasks), dtype=np.int64)
    groups: dict[str, list[int]] = {}
    for j, t in enumerate(tasks):
        groups.setdefault(t.test.key, []).append(j)
    for g, members in enumerate(groups.values()):
        hits = _hits(method, [tasks[j] for j in members], ctx, [stage, g])
        for j, h in zip(members, hits, strict=True):
            correct[j] = h
    return correct, np.array([len(t.test) for t in tasks])


def _hits(method: Method, tasks: list[Task], ctx: Context, salt: list[int]) -> list[int]:
    """Correct predictions per task, for tasks whose test sets are subsets of one split."""
    test = Split.concat([t.test for t in tasks])
    task_of = np.repeat(np.arange(len(tasks)), [len(t.test) for t in tasks])  # (N,)
    order = np.random.RandomState([ctx.seed % 2**32, *salt]).permutation(len(test))
    aware = tasks[0].kind == "task"
    given = aware or TASK_ID_AT_TEST in method.tags  # e.g. SupSup GG on a permuted stream
    ids = np.array([tasks[i].id for i in task_of[order]]) if given else None
    logits = method.predict(test.subset(order), ctx, ids)  # (N, C) in shuffled order
    if aware:
        logits = restrict(logits, [tasks[i].classes for i in task_of[order]])
    pred = torch.empty(len(test), dtype=torch.long)
    pred[torch.from_numpy(order)] = logits.argmax(1)
    hit = pred.numpy() == test.targets
    return [int(hit[task_of == i].sum()) for i in range(len(tasks))]


def restrict(logits: torch.Tensor, classes: list[tuple[int, ...]]) -> torch.Tensor:
    """Logits with every class outside the sample's own task set to -inf."""
    mask = torch.ones_like(logits, dtype=torch.bool)  # (N, C)
    for i, cs in enumerate(classes):
        mask[i, list(cs)] = False
    return logits.masked_fill(mask, float("-inf"))


def task_inference_accuracy(method: Method, tasks: list[Task], ctx: Context,
                            task_of: Callable[[np.ndarray], np.ndarray] | None = None
                            ) -> list[float] | None:
    """Per seen task, the share of its test samples whose task a method infers correctly; None
    for methods without task inference (those define ``infer_task(split, ctx) -> (N,) ids``).
    On a task-free stream a method can only name the segment it learned from: ``task_of`` maps
    segment ids to the tasks the evaluator knows."""
    infer = getattr(method, "infer_task", None)
    if infer is None:
        return None
    task_of = task_of or np.asarray
    return [float((task_of(np.asarray(infer(t.test, ctx))) == t.id).mean()) for t in tasks]
