"""APD: decomposed weights, retroactive reconstruction, pruning, k-means, an MNIST-5k stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import retain
from retain.backbones import create_backbone
from retain.context import Context
from retain.datasets.base import DataBundle
from retain.errors import ConfigError
from retain.evaluation import evaluate
from retain.layers.apd import DecomposedLayer, kmeans, max_pool_same, prune
from retain.methods import create_method
from retain.scenarios import make_scenario
from tests.conftest import tiny_bundle

SMALL = {"conv_channels": (6,), "hidden": (48,), "epochs": 4, "batch_size": 32}


@pytest.fixture(autouse=True)
def one_thread():
    """Small networks: one intra-op thread is as fast, and steady on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mnist_til():
    """MNIST-5k, 100 training and 30 test images per class, as TIL-B0Inc2 (5 tasks)."""
    b = retain.create_dataset("mnist5k").load()
    rng = np.random.RandomState(0)

    def sub(split, n):
        pos = [rng.choice(np.flatnonzero(split.targets == c), n, replace=False) for c in range(10)]
        return split.subset(np.sort(np.concatenate(pos)))

    bundle = DataBundle("mnist5k-sub", sub(b.train, 100), sub(b.test, 30), b.class_names)
    return make_scenario(bundle, "TIL-B0Inc2")


def layer_with_tasks(n: int, shape=(3, 4)) -> DecomposedLayer:
    g = torch.Generator().manual_seed(0)
    layer = DecomposedLayer(shape)
    layer.reset_shared(g)
    for _ in range(n):
        layer.add_task(g)
    return layer


def test_tau_starts_as_a_copy_of_sigma_and_test_weights_are_hard_pruned():
    layer = layer_with_tasks(1)
    torch.testing.assert_close(layer.adaptive[0].data, layer.shared.data)  # official init
    with torch.no_grad():
        layer.adaptive[0].copy_(torch.tensor([[0.5, -1e-3, 2e-3, 0.0]] * 3))
    s = torch.sigmoid(layer.masks[0]).view(3, 1)
    full = layer.weight(0)
    pruned = layer.weight(0, threshold=1.5e-3)
    torch.testing.assert_close(full, layer.shared * s + layer.adaptive[0])
    kept = torch.tensor([[0.5, 0.0, 2e-3, 0.0]] * 3)  # |τ| <= 1.5e-3 is dropped
    torch.testing.assert_close(pruned, layer.shared * s + kept)
    assert torch.equal(prune(torch.tensor([-2.0, 0.1, 3.0]), 0.1), torch.tensor([-2.0, 0.0, 3.0]))


def test_kmeans_guards_empty_clusters():
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]])
    init = torch.tensor([[2.0, 2.0], [2.0, 2.0]])  # duplicates: ties go to the first cluster
    assign, cent = kmeans(points, init, iters=1)
    assert assign.tolist() == [0, 0, 0]  # the second cluster is empty after one step ...
    torch.testing.assert_close(cent[1], init[1])  # ... and keeps its centroid (official: NaN)
    assign, cent = kmeans(points, init, iters=100)
    assert torch.isfinite(cent).all() and sorted(assign.tolist()) == [0, 0, 1]
    torch.testing.assert_close(cent[assign[2]], torch.tensor([5.0, 5.0]))
    torch.testing.assert_close(cent[assign[0]], torch.tensor([0.05, 0.0]))


@pytest.mark.parametrize("shuffle", ["shared", "per_layer"])
def test_kmeans_starts_from_one_order_or_one_per_layer(shuffle, monkeypatch):
    """The official ``k_means_clustering`` shuffles the tasks afresh inside its layer loop."""
    import retain.methods.apd as apd

    starts = []

    def recording(points, init, iters):
        starts.append([int((points == row).all(1).nonzero()[0]) for row in init])  # task ids
        return kmeans(points, init, iters)

    monkeypatch.setattr(apd, "kmeans", recording)
    m = create_method("apd", create_backbone("pixels", image_size=8), conv_channels=(),
                      hidden=(6, 5, 4), cluster_every=1, kmeans_shuffle=shuffle)
    g = torch.Generator().manual_seed(0)
    m.net_ = m._build()
    m.net_.reset(g)
    for _ in range(6):
        m.net_.add_task(2, g)
        for layer in m.net_.layers:  # distinct adaptive parts
            layer.adaptive[-1].data.normal_(generator=g)
    m._consolidate(6, g)
    assert len(starts) == len(m.net_.layers) == 3
    assert (len({tuple(s) for s in starts}) == 1) == (shuffle == "shared"), starts


def test_consolidation_shares_close_entries_and_keeps_the_others():
    layer = layer_with_tasks(3, shape=(1, 4))
    with torch.no_grad():
        layer.adaptive[0].copy_(torch.tensor([[1.0, 0.20, -3.0, 0.0]]))
        layer.adaptive[1].copy_(torch.tensor([[1.004, 0.50, -3.008, 0.0]]))
        layer.adaptive[2].copy_(torch.tensor([[7.0, 7.0, 7.0, 7.0]]))
    before = [layer.full_adaptive(j).clone() for j in range(3)]
    layer.consolidate(3, torch.tensor([1, 1, 0]), gap=0.01)
    assert layer.group == [0, 0, -1] and len(layer.local) == 1
    torch.testing.assert_close(layer.local[0], torch.tensor([[1.002, 0.0, -3.004, 0.0]]))
    torch.testing.assert_close(layer.adaptive[0].data, torch.tensor([[0.0, 0.20, 0.0, 0.0]]))
    for j in range(3):  # every task's adaptive part moves by at most gap / 2
        assert (layer.full_adaptive(j) - before[j]).abs().max() <= 0.005 + 1e-6
    layer.consolidate(3, torch.tensor([0, 1, 2]), gap=0.01)  # all singletons: absorbed back
    assert layer.group == [-1, -1, -1] and layer.local == []
    torch.testing.assert_close(layer.adaptive[1].data, before[1], atol=0.005, rtol=0)


def test_max_pool_same_matches_tensorflow_sizes():
    for size, out in ((32, 16), (28, 14), (16, 8), (7, 4)):
        assert max_pool_same(torch.zeros(1, 1, size, size)).shape[-1] == out


def drift_of_first_task(stream, **params) -> list[float]:
    """Relative change of θ_0 per layer while task 1 is learned."""
    m, ctx = create_method("apd", create_backbone("pixels"), **SMALL | params), Context()
    m.learn(stream[0], ctx)
    theta = [layer.weight(0).detach().clone() for layer in m.net_.layers]
    before, _ = evaluate(m, stream[:1], ctx, 0)
    m.learn(stream[1], ctx)
    after, _ = evaluate(m, stream[:2], ctx, 1)
    if params.get("approx", 1) > 0:
        assert after[0] >= before[0] - 1  # task 0 keeps its accuracy (60 test images)
    return [float((layer.weight(0) - th).norm() / th.norm())
            for layer, th in zip(m.net_.layers, theta, strict=True)]


def test_retroactive_update_reconstructs_old_weights(mnist_til):
    kept = drift_of_first_task(mnist_til, lr=3e-3)  # λ_2 = 100: τ_0 follows σ's changes
    free = drift_of_first_task(mnist_til, lr=3e-3, approx=0.0)  # τ_0 only shrunk by L1
    assert max(kept) < 0.05, kept
    assert all(k < f / 4 for k, f in zip(kept, free, strict=True)), (kept, free)


def test_learns_til_mnist_with_consolidation_and_reports_capacity(mnist_til):
    params = SMALL | {"epochs": 6, "cluster_every": 2, "k_centroids": 1}  # k = tasks / 2
    m, ctx = create_method("apd", create_backbone("pixels"), **params), Context(batch_size=64)
    for task in mnist_til:
        m.learn(task, ctx)
    correct, total = evaluate(m, mnist_til[:], ctx, 4)
    assert (correct / total).min() > 0.8, correct / total  # chance 0.5 per task
    layers = m.net_.layers
    assert all(layer.centroids.shape[0] == 2 for layer in layers)  # rounds after tasks 2 and 4
    assert any(layer.local for layer in layers)  # some clusters hold two tasks
    counts = m.parameter_counts()
    trunk = sum(layer.shared.numel() for layer in m.net_.layers)
    assert counts["capacity_base"] == trunk + 48 * 2 * 4
    assert 0 < counts["active"] <= counts["trainable"] == counts["total"]
    assert m.capacity() == counts["active"] / counts["capacity_base"]


def test_needs_a_task_incremental_stream_and_raw_pixels(tiny_vit):
    cil = make_scenario(tiny_bundle(), "B0Inc2")
    with pytest.raises(ConfigError, match="task id"):
        create_method("apd", create_backbone("pixels", image_size=16)).learn(cil[0], Context())
    til = make_scenario(tiny_bundle(), "TIL-B0Inc2")
    with pytest.raises(ConfigError, match="pixels"):
        create_method("apd", tiny_vit).learn(til[0], Context())
