"""PromptFusion: the fused logit and the old/new re-weighting by hand, the prompted CLIP image
feature, CoOp contexts through ``encode_embedded`` (old ones bit-identical), the memory budget,
batch independence and an end-to-end run on the tiny random CLIP + tiny random booster.

No test runs PromptFusion on real weights: the CLIP ViT-B/16 and the IN1K ViT-B/16 are not
available offline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retain.backbones import create_backbone
from retain.context import Context
from retain.errors import ConfigError
from retain.evaluation import evaluate
from retain.features import FeatureCache
from retain.layers.promptfusion import (
    embed_with_context,
    fuse,
    prompt_pooling,
    prompt_texts,
    reweight,
)
from retain.methods import create_method
from retain.scenarios import make_scenario
from retain.training import predict_batches

FAST = {"booster": "vit_tiny_random", "epochs": 8, "lr": 0.03, "batch_size": 4,
        "context_length": 2, "clip_prompt_length": 2, "booster_prompt_length": 2,
        "memory_size": 12, "booster_head": "token"}


@pytest.fixture(scope="module")
def clip_tiny():
    return create_backbone("clip_tiny_random", image_size=16)


@pytest.fixture
def stream(scenario):
    return make_scenario(scenario.bundle, "B0Inc2")


def fresh_ctx(batch_size: int = 16) -> Context:
    return Context(batch_size=batch_size, seed=1993, cache=FeatureCache())


def test_fused_logits_and_reweighted_loss_by_hand():
    z_clip = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]])
    z_vit = torch.tensor([[1.0, 1.0, -2.0], [4.0, 0.0, 1.0]])
    lam = torch.tensor([0.3])
    s = 1 / (1 + np.exp(-0.3))
    z = fuse(z_clip, z_vit, lam)
    torch.testing.assert_close(z, (1 - s) * z_clip + s * z_vit)
    assert abs(z[0, 0].item() - ((1 - s) * 2.0 + s * 1.0)) < 1e-6
    # 1 old class, 2 new; alpha/beta have more rows than the batch (first rows used)
    alpha = torch.tensor([[0.0, 1.0], [2.0, -1.0], [9.0, 9.0]])
    beta = torch.tensor([[0.5], [-0.5], [9.0]])
    theta = 0.5
    logp = F.log_softmax(z, 1)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    w = torch.tensor([[theta / sig(0.5), sig(0.0), sig(1.0)],
                      [theta / sig(-0.5), sig(2.0), sig(-1.0)]], dtype=torch.float32)
    torch.testing.assert_close(reweight(logp, alpha, beta, theta), logp * w)
    y = torch.tensor([2, 0])
    hand = -(w[0, 2] * logp[0, 2] + w[1, 0] * logp[1, 0]) / 2
    torch.testing.assert_close(F.nll_loss(reweight(logp, alpha, beta, theta), y), hand)


def test_prompt_texts_follow_the_official_placeholders():
    assert prompt_texts(["maple_tree"], 2) == ["X X X X maple tree."]


def test_prompted_clip_feature_is_the_mean_of_prompt_outputs_before_ln_post(clip_tiny):
    vit = clip_tiny.model
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompt = torch.randn(3, 2, vit.embed_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with prompt_pooling(vit, prompt):
            got = vit(x)  # (B, E)
        seq = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))  # (B, 1+N, D)
        seq = torch.cat([seq[:, :1], prompt, seq[:, 1:]], 1)  # (B, 1+2+N, D)
        want = vit.head(vit.norm(vit.blocks(seq)[:, 1:3].mean(1)))  # (B, E)
        plain = vit(x)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(plain, got)  # the hooks are gone afterwards
    assert not vit.norm._forward_pre_hooks and not vit.blocks[0]._forward_pre_hooks


def test_net_logits_by_hand(clip_tiny, stream):
    m, ctx = create_method("promptfusion", clip_tiny, **FAST | {"epochs": 1}), fresh_ctx()
    m.learn(stream[0], ctx)
    net, split = m.net_.eval(), stream[0].test
    xc, xv = m._inputs(split)(np.arange(4))
    with torch.no_grad():
        texts = net.text_features(0, 2)  # (2, E)
        z = net(xc, xv, texts)
        with prompt_pooling(net.clip, net.clip_prompt.expand(4, -1, -1)):
            img = F.normalize(net.clip(xc), dim=-1)
        z_clip = net.text.logit_scale.exp() * img @ texts.T
        vit = net.vit
        seq = vit._pos_embed(vit.patch_embed(xv))  # (B, 1+N, D)
        tokens = (net.vit_prompt + vit.pos_embed[:, :1]).expand(4, -1, -1)
        seq = vit.norm(vit.blocks(torch.cat([seq[:, :1], tokens, seq[:, 1:]], 1)))
        z_vit = seq[:, 0] @ net.head.weight.T + net.head.bias  # booster_head="token"
        s = torch.sigmoid(net.lam)
    torch.testing.assert_close(z, (1 - s) * z_clip + s * z_vit)


def test_contexts_reach_the_text_tower_and_old_ones_stay_bit_identical(clip_tiny, stream):
    m, ctx = create_method("promptfusion", clip_tiny, **FAST), fresh_ctx()
    m.learn(stream[0], ctx)
    net = m.net_
    first = net.contexts[0].detach().clone()
    text, tokens = net.text, net.tokens[:2]
    with torch.no_grad():
        emb = text.token_embedding(tokens).clone()  # (2, L, W)
        emb[:, 1:3] = first  # positions 1..M after SOS
        want = F.normalize(text.encode_embedded(emb, tokens.argmax(-1)), dim=-1)
        torch.testing.assert_close(net.text_features(0, 2), want)
    full = embed_with_context(text.token_embedding, tokens, first)
    torch.testing.assert_close(full[:, 3:], text.token_embedding(tokens)[:, 3:].detach())
    m.learn(stream[1], ctx)
    assert torch.equal(net.contexts[0], first) and not net.contexts[0].requires_grad
    assert net.contexts[1].requires_grad and len(net.tokens) == 4
    net.text_features(2, 4).sum().backward()  # gradients reach the current contexts
    assert net.contexts[1].grad.abs().sum() > 0


class _ReEncoded(nn.Module):
    """The prediction before the text features were stored: every class text re-encoded."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x_clip, x_vit):
        texts = self.net.text_features(0, len(self.net.tokens))  # (C, E)
        return self.net(x_clip, x_vit, texts)


def predict_counting_text_calls(method, split, ctx):
    """(logits, number of text-tower forward passes during ``method.predict``)."""
    calls = []
    handle = method.net_.text.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        return method.predict(split, ctx), len(calls)
    finally:
        handle.remove()


def test_stored_text_features_predict_as_re_encoding_without_the_text_tower(clip_tiny, stream):
    m, ctx = create_method("promptfusion", clip_tiny, **FAST | {"epochs": 2}), fresh_ctx()
    for task in stream:
        m.learn(task, ctx)
    net, test = m.net_, stream[2].test
    assert [len(f) for f in net.stored] == [2, 2, 2]
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(net.stored), net.text_features(0, 6),
                                   rtol=0, atol=1e-6)
    got, calls = predict_counting_text_calls(m, test, ctx)
    assert calls == 0
    calls_before = []  # the same hook counts the re-encoding of the previous prediction
    handle = net.text.transformer.register_forward_hook(lambda *a: calls_before.append(1))
    with torch.no_grad():
        want = predict_batches(_ReEncoded(net), m._inputs(test), len(test), ctx)  # (N, 6)
    handle.remove()
    assert len(calls_before) == -(-len(test) // ctx.batch_size)  # one per batch here
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_state_round_trip_predicts_bit_identically(clip_tiny, stream):
    m, ctx = create_method("promptfusion", clip_tiny, **FAST | {"epochs": 1}), fresh_ctx()
    for task in stream[:2]:
        m.learn(task, ctx)
    test = stream[1].test
    state = m.state_dict()
    width = clip_tiny.text.text_projection.shape[1]  # E
    assert state["texts.0"].shape == state["texts.1"].shape == (2, width)
    b = create_method("promptfusion", clip_tiny, **FAST)
    b.load_state_dict(state)
    got, calls = predict_counting_text_calls(b, test, ctx)
    assert calls == 0 and torch.equal(got, m.predict(test, ctx))
    old = create_method("promptfusion", clip_tiny, **FAST)  # a state saved before storing
    old.load_state_dict({k: v for k, v in state.items() if not k.startswith("texts.")})
    torch.testing.assert_close(old.predict(test, ctx), got, rtol=0, atol=1e-6)


def test_memory_budget_is_respected(clip_tiny, stream):
    m, ctx = create_method("promptfusion", clip_tiny, **FAST | {"memory_size": 8}), fresh_ctx()
    for task, per_class in zip(stream, (4, 2, 1), strict=True):  # 8 // classes seen
        m.learn(task, ctx)
        assert len(m.memory_) == per_class * task.num_seen <= 8
        assert m.memory_.classes == list(range(task.num_seen))


def test_prediction_of_a_sample_does_not_depend_on_its_batch(clip_tiny, stream):
    m, ctx = create_method("promptfusion", clip_tiny, **FAST), fresh_ctx()
    for task in stream[:2]:
        m.learn(task, ctx)
    test = stream[1].test
    full = m.predict(test, ctx)
    one = m.predict(test, fresh_ctx(batch_size=1))
    torch.testing.assert_close(one, full, rtol=1e-4, atol=1e-5)


def test_end_to_end_on_tiny_clip_and_tiny_booster(clip_tiny, stream):
    m, ctx = create_method("promptfusion", clip_tiny, **FAST), fresh_ctx()
    before = {k: v.clone() for k, v in clip_tiny.model.state_dict().items()}
    text_before = {k: v.clone() for k, v in clip_tiny.text.state_dict().items()}
    for task in stream:
        m.learn(task, ctx)
        correct, total = evaluate(m, stream[: task.id + 1], ctx, task.id)
    assert correct.sum() / total.sum() > 1 / 6  # above chance over all 6 classes
    assert m.booster_.name == "vit_tiny_random"
    assert all(torch.equal(v, clip_tiny.model.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(v, clip_tiny.text.state_dict()[k]) for k, v in text_before.items())
    state = m.state_dict()
    assert not any(k.startswith(("net.clip.", "net.text.", "net.vit.")) for k in state)
    assert state["net.alpha"].shape == (4, 2) and state["net.beta"].shape == (4, 4)
    counts = m.parameter_counts()
    assert counts["trainable"] == sum(v.numel() for k, v in state.items()
                                      if k.startswith("net.") and k != "net.tokens")


def test_needs_a_clip_backbone_and_room_for_the_class_name(tiny_vit, clip_tiny, stream):
    with pytest.raises(ConfigError, match="CLIP"):
        create_method("promptfusion", tiny_vit, **FAST).learn(stream[0], fresh_ctx())
    with pytest.raises(ConfigError, match="context vectors"):
        create_method("promptfusion", clip_tiny, **FAST | {"context_length": 8}).learn(
            stream[0], fresh_ctx())
