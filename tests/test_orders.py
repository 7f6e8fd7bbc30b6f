"""Running one stream in several task orders (APD's orders A-E, or explicit permutations)."""

from __future__ import annotations

import numpy as np
import pytest

from retain.config import make_config
from retain.datasets.base import DataBundle, Split
from retain.errors import ConfigError
from retain.runner import run
from retain.scenarios import ClassIncremental, make_scenario
from retain.scenarios.orders import SUPERCLASS_ORDERS, with_task_order
from retain.scenarios.streams import CIFAR100_SUPERCLASSES
from tests.conftest import tiny_bundle


def test_explicit_order_reorders_the_tasks_as_built():
    sc = ClassIncremental(tiny_bundle(), increment=2, seed=1993)
    re = with_task_order(sc, "2,0,1")
    blocks = [sc.class_order[0:2], sc.class_order[2:4], sc.class_order[4:6]]
    assert re.class_order.tolist() == np.concatenate([blocks[2], blocks[0], blocks[1]]).tolist()
    # task 0 of the new stream holds the images of the old task 2, relabelled 0..1
    assert len(re[0].train) == len(sc[2].train) and re[0].classes == (0, 1)
    assert sorted(re[0].train.targets.tolist()) == sorted((sc[2].train.targets - 4).tolist())


def test_letters_name_fixed_blocks_of_consecutive_labels():
    bundle = tiny_bundle(num_classes=10)
    a = with_task_order(make_scenario(bundle, "TIL-B0Inc2", seed=7), "B")  # 5 blocks: 14203
    assert a.class_order.tolist() == [2, 3, 8, 9, 4, 5, 0, 1, 6, 7]
    assert a.kind == "task"  # the stream type is kept
    b = with_task_order(make_scenario(bundle, "B0Inc2", seed=3), "B")
    assert b.class_order.tolist() == a.class_order.tolist()  # independent of the seed


def test_superclass_letters_follow_the_coarse_labels():
    names = tuple(c for g in CIFAR100_SUPERCLASSES.values() for c in g)
    split = Split(np.zeros((100, 2, 2), np.uint8), np.arange(100))
    bundle = DataBundle("cifar-names", split, split, names)
    sc = with_task_order(make_scenario(bundle, "Superclass-TIL"), "C")
    first = SUPERCLASS_ORDERS["C"][0]  # superclass 17 comes first in order C
    assert sc.class_order[:5].tolist() == list(range(5 * first, 5 * first + 5))


def test_bad_orders_are_clear_errors():
    sc = ClassIncremental(tiny_bundle(), increment=2, seed=1993)
    with pytest.raises(ConfigError, match="permutation of 0..2"):
        with_task_order(sc, "0,1,1")
    with pytest.raises(ConfigError, match="letter A-E"):
        with_task_order(sc, "first")
    with pytest.raises(ConfigError, match="equal size"):
        with_task_order(ClassIncremental(tiny_bundle(), increment=2, initial_increment=4), "A")
    with pytest.raises(ConfigError, match="class splits"):
        with_task_order(make_scenario(tiny_bundle(), "Permuted2"), "1,0")


def test_the_runner_takes_a_task_order(tmp_path):
    flags = {"dataset": "digits", "backbone": "vit_tiny_random", "method": "simplecil",
             "scenario": "B0Inc2", "task_order": "E", "cache_dir": str(tmp_path / "c"),
             "out": str(tmp_path / "run")}
    res = run(make_config(flags=flags), echo=lambda *_: None, progress=False)
    assert res["class_order"] == [4, 5, 8, 9, 0, 1, 2, 3, 6, 7]  # E over 5 blocks: 24013
