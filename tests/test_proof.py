"""PROOF: its equations on tiny tensors, frozen old projections, text encoded once per class,
the memory budget, batch independence and an end-to-end run on the tiny random CLIP.

No test runs PROOF on real CLIP weights: none are available offline.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retain.backbones import create_backbone
from retain.context import Context
from retain.evaluation import evaluate
from retain.features import FeatureCache
from retain.methods import create_method
from retain.methods.proof import _ProofNet

FAST = {"epochs": 10, "lr": 0.01, "batch_size": 8, "memory_size": 12}


@pytest.fixture(scope="module")
def clip_tiny():
    """clip_tiny_random at 16 px with a zero class token and positions: the plain tiny CLIP
    gives nearly one feature for every image (pairwise cos > 0.9999), this one does not."""
    b = create_backbone("clip_tiny_random", image_size=16)
    vit = copy.deepcopy(b.model)
    with torch.no_grad():
        vit.cls_token.zero_()
        vit.pos_embed.zero_()
    return dataclasses.replace(b, name="clip_tiny_spread", model=vit,
                               identity={**b.identity, "sha256": "clip-tiny-spread"})


def fresh_ctx() -> Context:
    return Context(batch_size=16, seed=1993, cache=FeatureCache())


def _net(dim=4, templates=2, classes=3, tasks=2, dropout=0.0) -> _ProofNet:
    g = torch.Generator().manual_seed(0)
    net = _ProofNet(dim, templates, dropout, False, torch.tensor(2.0), g)
    net.add_classes(torch.randn(classes, templates, dim, generator=g),
                    torch.randn(classes, dim, generator=g))
    for _ in range(tasks):
        net.add_task(3, g, True)
    with torch.no_grad():  # non-trivial LayerNorm parameters
        net.attn.norm.weight.uniform_(0.5, 1.5, generator=g)
        net.attn.norm.bias.uniform_(-0.5, 0.5, generator=g)
    return net


def _hand(net: _ProofNet, feat: torch.Tensor, train: bool, y=None):
    """PROOF's logits (test) or loss (train) written out from the official code."""
    P_i = lambda x: sum(x @ p.weight.T + p.bias for p in net.img_proj.projs)  # noqa: E731
    P_t = lambda x: sum(x @ p.weight.T + p.bias for p in net.text_proj.projs)  # noqa: E731
    raw = net.texts if not train else net.texts[:, :1]  # (C, T, E)
    t = torch.stack([F.normalize(P_t(raw[:, j]), dim=-1) for j in range(raw.shape[1])], 1)
    t = F.normalize(t.mean(1), dim=-1)  # (C, E)
    p = F.normalize(P_i(net.protos), dim=-1)  # (C, E)
    prompts = torch.cat(list(net.prompts))  # (2·3, E)
    img = P_i(feat)
    img = F.normalize(img, dim=-1) if train else img
    a, C, E = net.attn, len(t), feat.shape[1]
    rows = []
    for b in range(len(feat)):
        S = torch.cat([img[b : b + 1], t, p, prompts])  # (L, E)
        A = torch.softmax((S @ a.w_q.weight.T) @ (S @ a.w_k.weight.T).T / E**0.5, -1)
        H = (A @ (S @ a.w_v.weight.T)) @ a.fc.weight.T + a.fc.bias + S
        H = (H - H.mean(-1, keepdim=True)) / torch.sqrt(H.var(-1, unbiased=False, keepdim=True)
                                                         + a.norm.eps)
        H = H * a.norm.weight + a.norm.bias  # (L, E)
        rows.append((H[0] @ H[1 : 1 + C].T, H[0] @ H[1 + C : 1 + 2 * C].T))
    z_text, z_proto = (torch.stack(r) for r in zip(*rows, strict=True))  # (B, C) each
    if not train:
        return img @ t.T + z_text + z_proto
    s = net.logit_scale.exp()
    sim = s * img @ t[y].T  # (B, B)
    lab = torch.arange(len(y))
    clip = (F.cross_entropy(sim, lab) + F.cross_entropy(sim.T, lab)) / 2
    return F.cross_entropy(z_text, y) + clip + F.cross_entropy(z_proto, y)


def test_test_logits_match_hand_computation():
    net = _net().eval()
    feat = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(feat), _hand(net, feat, train=False))


def test_training_loss_matches_hand_computation():
    net = _net().train()  # dropout 0: deterministic
    feat = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 2, 1, 2, 0])
    torch.testing.assert_close(net.loss(feat, y), _hand(net, feat, train=True, y=y))


def test_projection_is_the_sum_over_tasks():
    net = _net(tasks=3)
    x = torch.randn(2, 4)
    want = sum(p(x) for p in net.img_proj.projs)
    torch.testing.assert_close(net.img_proj(x), want)
    assert len(net.img_proj.projs) == 3 and len(net.prompts) == 3


@pytest.mark.parametrize("freeze_text", [True, False])
def test_old_projections_and_prompts_stay_bit_identical(clip_tiny, scenario, freeze_text):
    m = create_method("proof", clip_tiny, **FAST, freeze_old_text_projections=freeze_text)
    ctx = fresh_ctx()
    m.learn(scenario[0], ctx)
    old = {k: v.clone() for k, v in m.net_.state_dict().items() if ".0." in k or k == "prompts.0"}
    attn = m.net_.attn.w_q.weight.clone()
    m.learn(scenario[1], ctx)
    now = m.net_.state_dict()
    for k, v in old.items():
        frozen = not k.startswith("text_proj") or freeze_text
        assert torch.equal(now[k], v) == frozen, k
    assert not torch.equal(m.net_.attn.w_q.weight, attn)  # the fusion module keeps learning


def test_class_texts_are_encoded_once_per_class_and_template(clip_tiny, scenario):
    backbone = dataclasses.replace(clip_tiny, text=copy.deepcopy(clip_tiny.text))
    encoded: list[str] = []
    original = backbone.text.encode_text
    backbone.text.encode_text = lambda texts: (encoded.extend(texts), original(texts))[1]
    templates = ("a photo of a {}.", "a drawing of a {}.")
    m, ctx = create_method("proof", backbone, **FAST, templates=templates), fresh_ctx()
    for task in scenario:
        m.learn(task, ctx)
        evaluate(m, scenario[: task.id + 1], ctx, task.id)
    names = scenario[2].class_names
    assert sorted(encoded) == sorted(t.format(n) for t in templates for n in names)


def test_memory_budget_is_respected(clip_tiny, scenario):
    m, ctx = create_method("proof", clip_tiny, **FAST | {"memory_size": 5}), fresh_ctx()
    for task in scenario:
        m.learn(task, ctx)
        quota = 5 // task.num_seen
        assert len(m.memory_) <= 5
        assert all(len(s) == quota for s in m.memory_.by_class.values())
        assert set(m.memory_.classes) == (set(range(task.num_seen)) if quota else set())


def test_prediction_of_a_sample_does_not_depend_on_its_batch(clip_tiny, scenario):
    m, ctx = create_method("proof", clip_tiny, **FAST), fresh_ctx()
    for task in scenario[:2]:
        m.learn(task, ctx)
    test = scenario[1].test
    full = m.predict(test, ctx)
    for i in (0, 7):
        torch.testing.assert_close(m.predict(test.subset(np.array([i])), ctx), full[i : i + 1])
    assert not m.uses_batch_information
    assert create_method("proof", clip_tiny, batch_mean=True).uses_batch_information


def test_end_to_end_learns_every_task_embedding_each_image_once(clip_tiny, scenario):
    m, ctx = create_method("proof", clip_tiny, **FAST), fresh_ctx()
    before = {k: v.clone() for k, v in clip_tiny.model.state_dict().items()}
    for task in scenario:
        m.learn(task, ctx)
        correct, total = evaluate(m, scenario[: task.id + 1], ctx, task.id)
        assert correct.sum() / total.sum() > 0.75, (task.id, correct, total)
    assert ctx.cache.images_embedded == sum(len(t.train) + len(t.test) for t in scenario)
    assert all(torch.equal(v, clip_tiny.model.state_dict()[k]) for k, v in before.items())
    counts = m.parameter_counts()
    per_task = 2 * (32 * 32 + 32) + 3 * 32  # two projections, three prompts
    shared = 4 * 32 * 32 + 32 + 2 * 32 + 1  # q, k, v, fc (+bias), LayerNorm, logit scale
    assert counts["trainable"] == 3 * per_task + shared


def test_end_to_end_on_clip_tiny_random(scenario):
    """The registered tiny random CLIP runs through a whole stream (finite logits)."""
    from retain.scenarios import make_scenario

    backbone = create_backbone("clip_tiny_random", image_size=16)
    stream = make_scenario(scenario.bundle, "B0Inc2")
    m, ctx = create_method("proof", backbone, **FAST), fresh_ctx()
    for task in stream:
        m.learn(task, ctx)
        z = m.predict(task.test, ctx)
        assert z.shape == (len(task.test), task.num_seen) and torch.isfinite(z).all()


def test_needs_a_text_tower(tiny_vit, scenario):
    from retain.errors import ConfigError

    with pytest.raises(ConfigError, match="text tower"):
        create_method("proof", tiny_vit).learn(scenario[0], fresh_ctx())
