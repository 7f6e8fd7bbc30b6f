"""DyTox: the task-attention block, the loss weights, the global memory, a tiny stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import retain.methods.dytox as dytox_module
from retain.backbones import create_backbone
from retain.context import Context
from retain.errors import ConfigError
from retain.evaluation import evaluate
from retain.layers.task_attention import TaskAttentionBlock
from retain.methods import create_method
from retain.scenarios import ClassIncremental
from tests.conftest import tiny_bundle

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2, "epochs": 30, "finetune_epochs": 15,
        "batch_size": 8, "lr": 0.3, "finetune_lr": 0.06, "warmup_epochs": 1, "memory_size": 12,
        "augment": "none"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks: one intra-op thread is as fast, and steady on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_task_attention_updates_only_the_token_with_a_token_query():
    torch.manual_seed(0)
    block = TaskAttentionBlock(8, num_heads=2).eval()
    token, patches = torch.randn(3, 1, 8), torch.randn(3, 5, 8)
    kept = patches.clone()
    out = block(token, patches)
    assert out.shape == (3, 1, 8) and torch.equal(patches, kept)  # patches read, not written
    # by hand: the query is the token's alone; keys and values come from [token; patches]
    a = block.attn
    z = block.norm1(torch.cat([token, patches], 1))  # (3, 6, 8)
    q = a.q(z[:, 0]).view(3, 2, 4)  # (B, heads, d_h)
    k, v = a.k(z).view(3, 6, 2, 4), a.v(z).view(3, 6, 2, 4)
    w = torch.softmax(torch.einsum("bhd,bnhd->bhn", q, k) / 2.0, dim=-1)  # √d_h = 2
    y = token + a.proj(torch.einsum("bhn,bnhd->bhd", w, v).reshape(3, 1, 8))
    y = y + block.mlp(block.norm2(y))
    torch.testing.assert_close(out, y)
    # a patch changes the token's output; the token itself never enters another token's pass
    bumped = patches.clone()
    bumped[:, 2] = torch.randn(3, 8)
    assert not torch.allclose(block(token, bumped), out)


def test_every_layernorm_has_convit_s_eps():
    """DyTox builds ConViT's blocks and ContinualClassifier with nn.LayerNorm: eps 1e-5."""
    from retain.layers.dytox import build_dytox

    net = build_dytox(16, 3, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                      drop_path=0.0)
    net.add_task(2, divergence=True)
    eps = {m.eps for m in net.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-5}


def test_old_task_embeddings_do_not_depend_on_later_tokens():
    m = create_method("dytox", create_backbone("pixels_rgb", image_size=16), **TINY)
    net = m._build().eval()
    net.add_task(2, divergence=False)
    x = torch.randn(4, 3, 16, 16)
    first = net.embeddings(x)[0]
    net.add_task(2, divergence=True)
    e = net.embeddings(x)
    assert len(e) == 2 and torch.equal(e[0], first)  # the encoder output is shared, untouched
    logits, div = net.outputs(x)
    assert logits.shape == (4, 4) and div.shape == (4, 3)


def test_loss_weights_kd_by_the_old_class_share():
    g = torch.Generator().manual_seed(0)
    n_old, n_all = 6, 10
    logits, old = torch.randn(5, n_all, generator=g), torch.randn(5, n_old, generator=g)
    div = torch.randn(5, n_all - n_old + 1, generator=g)
    y = torch.tensor([0, 5, 6, 9, 7])
    target = dytox_module.soft_targets(y, n_all)
    loss, parts = dytox_module.dytox_loss(logits, div, old, target, tau=2.0, div_weight=0.1)
    alpha = n_old / n_all
    assert parts["alpha"] == alpha
    clf = F.binary_cross_entropy_with_logits(logits, target)
    p_old, log_new = torch.softmax(old / 2, 1), torch.log_softmax(logits[:, :n_old] / 2, 1)
    kd = 4.0 * (p_old * (p_old.log() - log_new)).sum() / (5 * n_old)  # 'mean' over B x n_old
    div_target = torch.zeros(5, 5)
    div_target[torch.arange(5), torch.tensor([0, 0, 1, 4, 2])] = 1  # old -> 0, new c -> 1 + c - 6
    expected = (1 - alpha) * clf + alpha * kd + 0.1 * F.binary_cross_entropy_with_logits(
        div, div_target)
    torch.testing.assert_close(loss, expected)
    first, parts = dytox_module.dytox_loss(logits, None, None, target, tau=1.0, div_weight=0.1)
    torch.testing.assert_close(first, clf)  # task 0: classification only


def test_training_uses_alpha_n_old_over_n_all_and_a_global_memory(monkeypatch):
    alphas = []

    def spy(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        alphas.append((args[0].shape[1], parts["alpha"], "div" in parts))
        return loss, parts

    real = dytox_module.dytox_loss
    monkeypatch.setattr(dytox_module, "dytox_loss", spy)
    scenario = ClassIncremental(tiny_bundle(), increment=2, seed=1993)
    m = create_method("dytox", create_backbone("pixels_rgb", image_size=16), **TINY)
    ctx = Context(batch_size=16)
    for task in scenario:
        alphas.clear()
        m.learn(task, ctx)
        n_old = task.num_seen - 2
        main = {a for a in alphas if a[2]}  # main training (with the divergence head)
        assert main == ({(task.num_seen, n_old / task.num_seen, True)} if task.id else set())
        assert len(m.memory_) <= 12 and len(m.memory_) == task.num_seen * (12 // task.num_seen)
        assert m.memory_.classes == list(task.seen_classes)
    assert m.net_.div_head is None and len(m.net_.tokens) == 3


def test_learns_a_tiny_stream_end_to_end_and_mixup_runs():
    scenario = ClassIncremental(tiny_bundle(), increment=2, seed=1993)
    backbone = create_backbone("pixels_rgb", image_size=16)
    for params in (TINY, TINY | {"mixup": 0.8, "augment": "crop_flip", "epochs": 3}):
        m, ctx = create_method("dytox", backbone, **params), Context(batch_size=16)
        for task in scenario:
            m.learn(task, ctx)
        correct, total = evaluate(m, scenario[:], ctx, 2)
        assert np.isfinite(m.predict(scenario[2].test, ctx).numpy()).all()
        if "mixup" not in params:
            assert (correct / total).min() > 0.8, correct / total  # no task forgotten
    counts = m.parameter_counts()
    assert counts["trainable"] == counts["total"] > 0


def test_needs_raw_pixels(tiny_vit):
    scenario = ClassIncremental(tiny_bundle(), increment=2, seed=1993)
    with pytest.raises(ConfigError, match="pixels"):
        create_method("dytox", tiny_vit, **TINY).learn(scenario[0], Context())
