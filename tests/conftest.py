"""Shared fixtures: a tiny synthetic stream that every method can learn in seconds."""

from __future__ import annotations

import numpy as np
import pytest

from retain.backbones import create_backbone
from retain.context import Context
from retain.datasets.base import DataBundle, Split
from retain.features import FeatureCache
from retain.scenarios import ClassIncremental


def tiny_bundle(num_classes: int = 6, train: int = 12, test: int = 6, size: int = 16,
                seed: int = 0) -> DataBundle:
    """Gray images where class c lights up its own block, plus noise: easy but not trivial."""
    rng = np.random.RandomState(seed)

    def make(n):
        x = rng.randint(0, 60, size=(num_classes * n, size, size)).astype(np.uint8)
        y = np.repeat(np.arange(num_classes), n)
        for i, c in enumerate(y):
            r, col = divmod(int(c), 3)
            x[i, r * 5 : r * 5 + 5, col * 5 : col * 5 + 5] += 180
        return Split(x, y)

    return DataBundle("tiny", make(train), make(test), tuple(f"c{i}" for i in range(num_classes)))


@pytest.fixture(scope="session")
def bundle() -> DataBundle:
    return tiny_bundle()


@pytest.fixture
def scenario(bundle) -> ClassIncremental:
    return ClassIncremental(bundle, increment=2, seed=1993)


@pytest.fixture(scope="session")
def tiny_vit():
    return create_backbone("vit_tiny_random", image_size=16)


@pytest.fixture
def ctx() -> Context:
    return Context(batch_size=16, seed=1993, cache=FeatureCache())


def mnist_subset(train_per_class: int, test_per_class: int) -> DataBundle:
    """The first images of each class of MNIST-5k (the offline real-data stream)."""
    from retain.datasets import create_dataset

    data = create_dataset("mnist5k").load()
    pick = [np.concatenate([np.flatnonzero(s.targets == c)[:n] for c in range(10)])
            for s, n in ((data.train, train_per_class), (data.test, test_per_class))]
    return DataBundle("mnist5k-subset", data.train.subset(pick[0]), data.test.subset(pick[1]),
                      data.class_names)
