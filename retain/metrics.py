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


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties averaged); 0.5 without both classes."""
    positive = np.asarray(positive, bool)
    p, n = int(positive.sum()), int((~positive).sum())
    if p == 0 or n == 0:
        return 0.5
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, ranks) / counts)[inverse]
    return float((ranks[positive].sum() - p * (p + 1) / 2) / (p * n))


def mean_class_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the k columns of ``scores`` (N, k) of the one-vs-rest ROC AUC of class c (labels
    in 0..k-1): DEN's metric (official ``DEN.py::get_performance``, ``ops.py::ROC_AUC``)."""
    labels = np.asarray(labels)
    return float(np.mean([roc_auc(scores[:, c], labels == c) for c in range(scores.shape[1])]))
