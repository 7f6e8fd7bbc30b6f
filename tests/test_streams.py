"""Task- and domain-incremental streams, and task-aware evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retain.context import Context
from retain.errors import ConfigError
from retain.evaluation import evaluate, restrict
from retain.methods import create_method
from retain.scenarios import (
    CIFAR100_SUPERCLASSES,
    PermutedStream,
    RotatedStream,
    TaskFree,
    make_scenario,
    superclass_order,
)
from retain.scenarios.streams import rotate
from tests.conftest import tiny_bundle


def test_permuted_stream_permutes_every_task_including_the_first():
    b = tiny_bundle()
    s = PermutedStream(b, 3, seed=1)
    assert len(s) == 3 and s[0].kind == "domain"
    assert s[0].new_classes == tuple(range(6)) and s[1].new_classes == ()
    perm = np.random.RandomState(1).permutation(16 * 16)
    expected = b.train.data.reshape(len(b.train), -1)[:, perm].reshape(b.train.data.shape)
    assert np.array_equal(s[0].train.data, expected)
    assert s[0].train.key != s[1].train.key != b.train.key
    assert np.array_equal(s[2].train.targets, b.train.targets)


def test_rotation_by_90_degrees_is_exact_and_0_is_identity():
    img = np.zeros((1, 8, 8), np.uint8)
    img[0, 0, 3] = 200  # a pixel in the top row
    assert np.array_equal(rotate(img, 0.0), img)
    turned = rotate(img, 90.0)
    assert turned.sum() == 200 and turned[0, :, 3].sum() == 0  # it left the column
    s = RotatedStream(tiny_bundle(), [0, 90])
    assert np.array_equal(s[0].test.data, tiny_bundle().test.data)


def test_superclass_order_groups_fine_classes():
    names = [n for g in CIFAR100_SUPERCLASSES.values() for n in g][::-1]  # any label order
    order = superclass_order(names)
    first = {names[i] for i in order[:5]}
    assert first == set(CIFAR100_SUPERCLASSES["aquatic mammals"])
    assert sorted(order.tolist()) == list(range(100))
    with pytest.raises(ConfigError, match="cifar100"):
        superclass_order(["a", "b"])


@pytest.mark.parametrize("name,kind,n", [("B0Inc2", "class", 3), ("TIL-B0Inc2", "task", 3),
                                         ("Permuted2", "domain", 2), ("Rotated4", "domain", 4)])
def test_make_scenario(name, kind, n):
    s = make_scenario(tiny_bundle(), name)
    assert len(s) == n and s[0].kind == kind == s.kind
    with pytest.raises(ConfigError, match="unknown scenario"):
        make_scenario(tiny_bundle(), "Shuffled3")


def test_restrict_masks_other_tasks():
    z = torch.arange(8.0).view(2, 4)
    r = restrict(z, [(0, 1), (2, 3)])
    assert r.argmax(1).tolist() == [1, 3] and torch.isinf(r[0, 2])


def test_task_aware_evaluation_is_at_least_class_aware(tiny_vit):
    b = tiny_bundle()
    ctx = Context()
    cil, til = make_scenario(b, "B0Inc2"), make_scenario(b, "TIL-B0Inc2")
    m_c, m_t = create_method("simplecil", tiny_vit), create_method("simplecil", tiny_vit)
    for tc, tt in zip(cil, til, strict=True):
        m_c.learn(tc, ctx)
        m_t.learn(tt, ctx)
    c_cil, _ = evaluate(m_c, cil[:], ctx, 2)
    c_til, _ = evaluate(m_t, til[:], ctx, 2)
    assert (c_til >= c_cil).all() and c_til.sum() > c_cil.sum() - 1


def test_domain_stream_evaluation_embeds_each_task_once(tiny_vit):
    s = make_scenario(tiny_bundle(), "Permuted3")
    m, ctx = create_method("simplecil", tiny_vit), Context()
    for task in s:
        m.learn(task, ctx)
        evaluate(m, s[: task.id + 1], ctx, task.id)
    assert ctx.cache.images_embedded == len(s[0].train) + 3 * len(s[0].test)


# ---------------------------------------------------------------------------------- task-free

def test_task_free_segments_cover_each_task_once_in_unmarked_pieces():
    inner = make_scenario(tiny_bundle(), "B0Inc2")  # 3 tasks, 24 training images each
    free = make_scenario(tiny_bundle(), "TaskFree10:B0Inc2")
    assert isinstance(free, TaskFree) and len(free) == 3 and free.kind == "class"
    assert [free.num_segments(t) for t in range(3)] == [3, 3, 3]  # 10 + 10 + 4
    ids = []
    for t in range(3):
        segs = free.segments(t)
        assert [len(s.train) for s in segs] == [10, 10, 4]
        assert all(s.free and len(s.test) == 0 for s in segs)
        got = np.sort(np.concatenate([s.train.index for s in segs]))
        np.testing.assert_array_equal(got, np.sort(inner[t].train.index))  # each sample once
        assert all(set(s.classes) <= set(inner[t].classes) for s in segs)  # never straddles
        assert segs[-1].seen_classes == inner[t].seen_classes
        new = [c for s in segs for c in s.new_classes]
        assert sorted(new) == list(inner[t].new_classes)  # each class new exactly once
        ids += [s.id for s in segs]
    assert ids == list(range(9))
    np.testing.assert_array_equal(free.task_of(np.arange(9)), np.repeat(np.arange(3), 3))
    again = free.segments(1)  # re-entrant and seeded
    np.testing.assert_array_equal(again[0].train.index, free.segments(1)[0].train.index)
    assert free[1].id == 1 and not free[1].free  # evaluation sees the real tasks


def test_task_free_names_and_errors():
    b = tiny_bundle()
    assert make_scenario(b, "TaskFree:Permuted2").segment == 500
    assert make_scenario(b, "TaskFree7:Rotated2").segments(1)[0].id == 11  # 72 images: 11 segs
    with pytest.raises(ConfigError, match="TaskFree500:Permuted5"):
        make_scenario(b, "TaskFree-Permuted5")
    with pytest.raises(ConfigError, match="at least 1 sample"):
        make_scenario(b, "TaskFree0:B0Inc2")
