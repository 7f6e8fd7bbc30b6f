"""Continual-learning metrics: pure functions over per-stage, per-task correct/total counts.

``correct[i][j]`` / ``total[i][j]``: test samples of task j classified correctly / evaluated after
learning task i (j <= i; entries above the diagonal are NaN / 0). Accuracies are fractions.
"""

from __future__ import annotations

import numpy as np


def accuracy_matrix(correct: np.ndarray, total: np.ndarray) -> np.ndarray:
    """R[i, j]: accuracy on task j's test set after learning task i (NaN for j > i)."""
    correct, total = np.asarray(correct, float), np.asarray(total, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = correct / total
    return np.where(np.tril(np.ones_like(r, dtype=bool)), r, np.nan)


def seen_accuracy(correct: np.ndarray, total: np.ndarray) -> np.ndarray:
    """A_i: top-1 accuracy over the test samples of every class seen up to stage i."""
    correct, total = np.tril(np.asarray(correct, float)), np.tril(np.asarray(total, float))
    return correct.sum(1) / total.sum(1)


def average_incremental_accuracy(seen: np.ndarray) -> float:
    """Ā = (1/B) Σ_b A_b (Rebuffi et al., iCaRL, CVPR 2017; the survey's Ā)."""
    return float(np.mean(seen))


def last_accuracy(seen: np.ndarray) -> float:
    """A_B: accuracy on all classes after the last stage (L2P/DualPrompt's 'average accuracy')."""
    return float(seen[-1])


def forgetting(r: np.ndarray) -> float:
    """Average forgetting (Chaudhry et al., RWalk, ECCV 2018): mean over tasks j < T-1 of
    max_{l < T-1} R[l, j] - R[T-1, j]. NaN with a single task."""
    t = r.shape[0]
    if t < 2:
        return float("nan")
    best = np.nanmax(r[: t - 1, : t - 1], axis=0)
    return float(np.mean(best - r[t - 1, : t - 1]))


def backward_transfer(r: np.ndarray) -> float:
    """BWT (Lopez-Paz & Ranzato, GEM, NeurIPS 2017): mean over j < T-1 of R[T-1, j] - R[j, j]."""
    t = r.shape[0]
    if t < 2:
        return float("nan")
    return float(np.mean(r[t - 1, : t - 1] - np.diag(r)[: t - 1]))


def old_new_accuracy(correct: np.ndarray, total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per stage i: accuracy on the test samples of tasks < i (old; NaN at i = 0) and of task i."""
    correct, total = np.asarray(correct, float), np.asarray(total, float)
    n = correct.shape[0]
    old = np.full(n, np.nan)
    for i in range(1, n):
        old[i] = correct[i, :i].sum() / total[i, :i].sum()
    new = np.diag(correct) / np.diag(total)
    return old, new


def summary(correct: np.ndarray, total: np.ndarray) -> dict:
    """Every scalar metric of a (possibly unfinished) run, as plain floats."""
    r = accuracy_matrix(correct, total)
    seen = seen_accuracy(correct, total)
    old, new = old_new_accuracy(correct, total)
    return {"avg_incremental_accuracy": average_incremental_accuracy(seen),
            "last_accuracy": last_accuracy(seen), "forgetting": forgetting(r),
            "backward_transfer": backward_transfer(r), "seen_accuracy": seen.tolist(),
            "old_accuracy": old.tolist(), "new_accuracy": new.tolist()}
