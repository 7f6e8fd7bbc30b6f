import numpy as np
import pytest

from retain.errors import ConfigError
from retain.scenarios import ClassIncremental, class_order_for, parse_notation, task_sizes
from tests.conftest import tiny_bundle


def test_cifar100_order_with_seed_1993_matches_the_anchors():
    # PyCIL/PILOT/EASE logs: np.random.seed(1993); np.random.permutation(100)
    assert class_order_for(100, 1993)[:10].tolist() == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]


@pytest.mark.parametrize("text,expected", [("B0Inc10", (0, 10)), ("B50Inc5", (50, 5))])
def test_notation(text, expected):
    assert parse_notation(text) == expected


@pytest.mark.parametrize("bad", ["Inc10", "B0Inc0", "b0inc10", "B0Inc", ""])
def test_bad_notation_is_an_error(bad):
    with pytest.raises(ConfigError, match="B\\{m\\}Inc\\{n\\}"):
        parse_notation(bad)


def test_task_sizes_follow_pilot_with_remainder():
    assert task_sizes(100, 0, 10) == [10] * 10
    assert task_sizes(100, 50, 10) == [50] + [10] * 5
    assert task_sizes(10, 0, 4) == [4, 4, 2]
    with pytest.raises(ConfigError):
        task_sizes(10, 20, 5)


def test_tasks_partition_the_classes_and_remap_labels():
    bundle = tiny_bundle(num_classes=6)
    sc = ClassIncremental(bundle, increment=2, seed=1993)
    assert len(sc) == 3
    seen = []
    for t, task in enumerate(sc):
        assert task.id == t and task.kind == "class"
        assert task.classes == task.new_classes == (2 * t, 2 * t + 1)
        assert task.seen_classes == tuple(range(2 * t + 2))
        assert set(task.train.targets) == set(task.classes) == set(task.test.targets)
        original = sc.class_order[task.train.targets]  # back to dataset labels
        assert np.array_equal(original, bundle.train.targets[task.train.index])
        seen.append(task.train.index)
    assert len(np.unique(np.concatenate(seen))) == len(bundle.train)


def test_indexing_slicing_and_reentrant_iteration():
    sc = ClassIncremental(tiny_bundle(), increment=2)
    assert [t.id for t in sc[1:]] == [1, 2]
    assert sc[-1].id == 2
    outer = [(a.id, b.id) for a in sc for b in sc]  # nested loops work: the scenario is no iterator
    assert len(outer) == 9
    with pytest.raises(IndexError):
        sc[3]


def test_explicit_class_order_and_validation():
    bundle = tiny_bundle()
    sc = ClassIncremental(bundle, increment=3, class_order=[5, 4, 3, 2, 1, 0])
    assert sc.class_names[0] == "c5"
    with pytest.raises(ConfigError):
        ClassIncremental(bundle, increment=3, class_order=[0, 0, 1, 2, 3, 4])


def test_natural_order_without_seed():
    sc = ClassIncremental(tiny_bundle(), increment=2, seed=None)
    assert sc.class_order.tolist() == list(range(6))


def test_tasks_carry_the_names_of_the_labels_seen_so_far():
    from retain.scenarios import make_scenario

    bundle = tiny_bundle()
    sc = ClassIncremental(bundle, increment=2, seed=1993)
    names = [bundle.class_names[c] for c in sc.class_order]
    assert sc[1].class_names == tuple(names[:4])
    assert make_scenario(bundle, "TIL-B0Inc2")[2].class_names == tuple(names)
    assert make_scenario(bundle, "Rotated2")[1].class_names == bundle.class_names
