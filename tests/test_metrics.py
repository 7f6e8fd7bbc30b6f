import numpy as np
import pytest

from retain import metrics

# 3 tasks, 10 test images each; hand-written counts
CORRECT = np.array([[9, 0, 0], [6, 8, 0], [4, 7, 10]])
TOTAL = np.array([[10, 0, 0], [10, 10, 0], [10, 10, 10]])


def test_accuracy_matrix_is_lower_triangular():
    r = metrics.accuracy_matrix(CORRECT, TOTAL)
    assert r[1, 0] == 0.6 and r[2, 2] == 1.0
    assert np.isnan(r[0, 1]) and np.isnan(r[0, 2]) and np.isnan(r[1, 2])


def test_seen_accuracy_average_and_last():
    seen = metrics.seen_accuracy(CORRECT, TOTAL)
    assert seen == pytest.approx([0.9, 0.7, 0.7])
    assert metrics.average_incremental_accuracy(seen) == pytest.approx((0.9 + 0.7 + 0.7) / 3)
    assert metrics.last_accuracy(seen) == pytest.approx(0.7)


def test_seen_accuracy_weights_tasks_by_their_size():
    correct, total = np.array([[1, 0], [1, 30]]), np.array([[2, 0], [2, 40]])
    assert metrics.seen_accuracy(correct, total)[1] == pytest.approx(31 / 42)


def test_forgetting_and_backward_transfer_by_hand():
    r = metrics.accuracy_matrix(CORRECT, TOTAL)
    # task 0: best before last 0.9, final 0.4 -> 0.5; task 1: best 0.8, final 0.7 -> 0.1
    assert metrics.forgetting(r) == pytest.approx((0.5 + 0.1) / 2)
    # BWT: (0.4 - 0.9 + 0.7 - 0.8) / 2
    assert metrics.backward_transfer(r) == pytest.approx(-0.3)


def test_single_task_has_no_forgetting():
    r = metrics.accuracy_matrix(np.array([[5]]), np.array([[10]]))
    assert np.isnan(metrics.forgetting(r)) and np.isnan(metrics.backward_transfer(r))


def test_old_new_accuracy():
    old, new = metrics.old_new_accuracy(CORRECT, TOTAL)
    assert np.isnan(old[0]) and old[1] == pytest.approx(0.6) and old[2] == pytest.approx(0.55)
    assert new == pytest.approx([0.9, 0.8, 1.0])


def test_summary_keys():
    s = metrics.summary(CORRECT, TOTAL)
    assert s["last_accuracy"] == pytest.approx(0.7)
    assert len(s["seen_accuracy"]) == 3
