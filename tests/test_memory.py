"""The exemplar memory: herding order, budgets, shrinking, exact state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retain.io import read_tensors, write_tensors
from retain.memory import ExemplarMemory, SampleStore, barycenter, herding
from retain.scenarios import ClassIncremental
from tests.conftest import tiny_bundle


def greedy_reference(f: np.ndarray, m: int) -> list[int]:
    """iCaRL Alg. 4 written out: p_k = argmin_x ‖μ − (x + Σ_{j<k} p_j) / k‖, without repeats."""
    mu, chosen = f.mean(0), []
    for k in range(1, m + 1):
        best, best_d = None, np.inf
        for i in range(len(f)):
            if i in chosen:
                continue
            d = np.linalg.norm(mu - (f[chosen].sum(0) + f[i]) / k)
            if d < best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_herding_picks_the_greedy_icarl_order_on_a_hand_example():
    # mean 3.2: 3 first; then (3 + x) / 2 closest to 3.2 is x = 2; then x = 1 ((6)/3 = 2 beats
    # (15)/3 = 5); then (6 + x) / 4: x = 10 gives 4 (0.8 away), x = 0 gives 1.5 (1.7 away).
    f = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    assert herding(f, 5, normalize=False).tolist() == [3, 2, 1, 4, 0]
    assert barycenter(f, 5).tolist() == [3, 2, 1, 0, 4]  # the mean-distance order differs
    assert herding(f, 2, normalize=False).tolist() == [3, 2]


def test_herding_matches_a_written_out_reference_and_normalises():
    f = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    unit = f / f.norm(dim=1, keepdim=True)
    assert herding(f, 12).tolist() == greedy_reference(unit.double().numpy(), 12)
    assert herding(f, 12).tolist() == herding(unit, 12, normalize=False).tolist()
    assert herding(f, 100).sort().values.tolist() == list(range(30))  # at most n, no repeats


def stream():
    return ClassIncremental(tiny_bundle(), increment=2, seed=1993)  # 12 images per class


def features(split) -> torch.Tensor:
    return torch.from_numpy(split.data.reshape(len(split), -1).astype(np.float32))  # (N, 256)


def test_total_budget_is_respected_and_old_classes_shrink_to_their_best_ranked():
    memory = ExemplarMemory(20)  # 10, then 5, then 3 per class
    before = {}
    for task in stream():
        memory.update(task.train, features(task.train))
        q = 20 // task.num_seen
        assert len(memory) <= 20
        assert memory.classes == list(task.seen_classes)
        for c in memory.classes:
            kept = memory.by_class[c].index
            assert len(kept) == q
            if c in before:  # shrinking keeps the prefix of the herding order
                assert np.array_equal(kept, before[c][:q])
            before[c] = kept
    last = stream()[2].train
    pos = np.flatnonzero(last.targets == 4)
    expected = last.index[pos[herding(features(last)[pos], 3).numpy()]]
    assert np.array_equal(memory.by_class[4].index, expected)
    assert set(memory.as_split().targets) == set(range(6))


def test_fixed_per_class_budget_and_zero_quota():
    memory = ExemplarMemory(3, per_class=True, selection="barycenter")
    for task in stream():
        memory.update(task.train, features(task.train))
    assert len(memory) == 18 and all(len(s) == 3 for s in memory.by_class.values())
    tight = ExemplarMemory(4)
    for task in stream():
        tight.update(task.train, features(task.train))
    assert tight.num_classes == 6 and len(tight) == 0  # 4 // 6 = 0 per class
    with pytest.raises(ValueError, match="empty"):
        tight.as_split()


def test_random_selection_is_seeded_and_feature_methods_need_features():
    a, b = ExemplarMemory(6, selection="random"), ExemplarMemory(6, selection="random")
    task = stream()[0]
    a.update(task.train, generator=torch.Generator().manual_seed(3))
    b.update(task.train, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(a.as_split().index, b.as_split().index)
    with pytest.raises(ValueError, match="features"):
        ExemplarMemory(6).update(task.train)


def test_state_round_trip_is_exact(tmp_path):
    memory = ExemplarMemory(10)
    tasks = stream()
    for task in tasks[:2]:
        memory.update(task.train, features(task.train))
    write_tensors(tmp_path / "m.safetensors", memory.state("memory."))
    copy = ExemplarMemory(10)
    copy.load(read_tensors(tmp_path / "m.safetensors"), "memory.")
    a, b = memory.as_split(), copy.as_split()
    assert np.array_equal(a.data, b.data) and np.array_equal(a.targets, b.targets)
    assert np.array_equal(a.index, b.index) and a.key == b.key
    assert copy.num_classes == memory.num_classes and copy.classes == memory.classes
    for m in (memory, copy):
        m.update(tasks[2].train, features(tasks[2].train))
    assert np.array_equal(memory.as_split().index, copy.as_split().index)
    empty = ExemplarMemory(10)
    empty.load(ExemplarMemory(10).state("x."), "x.")
    assert len(empty) == 0


def test_sample_store_still_appends():
    store = SampleStore()
    for task in stream():
        store.add(task.train)
    assert len(store) == len(tiny_bundle().train)
