"""Evaluation as a function: after a stage, count correct predictions on every seen task.

The test samples of all seen tasks are concatenated and presented in a shuffled order (seeded by
the run seed and the stage), so no method can profit from class-ordered batches (pitfall §1.2);
predictions are mapped back before counting.
"""

from __future__ import annotations

import numpy as np
import torch

from .context import Context
from .datasets.base import Split
from .methods.base import Method
from .scenarios.base import Task


def evaluate(method: Method, tasks: list[Task], ctx: Context, stage: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """(correct, total) per task in ``tasks`` (the tasks seen so far) after stage ``stage``."""
    test = Split.concat([t.test for t in tasks])
    order = np.random.RandomState([ctx.seed % 2**32, stage]).permutation(len(test))
    logits = method.predict(test.subset(order), ctx)  # (N, C) in shuffled order
    pred = torch.empty(len(test), dtype=torch.long)
    pred[torch.from_numpy(order)] = logits.argmax(1)
    hit = (pred.numpy() == test.targets)
    bounds = np.cumsum([0] + [len(t.test) for t in tasks])
    correct = np.array([hit[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    return correct, np.diff(bounds)
