"""PEFT modules injected into timm's ViT: identity at zero size/init, placement, per-sample
prefixes, exact detach, gradients, isolation between instances, parameter counts on ViT-B/16."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer

from retain.errors import ConfigError
from retain.layers import peft as P
from retain.layers.inject import unwrap

B = 4
ATTACH = {
    "vpt_shallow": lambda vit: P.attach_vpt(vit, 3),
    "vpt_deep": lambda vit: P.attach_vpt(vit, 3, deep=True),
    "vpt_pilot": lambda vit: P.attach_vpt(vit, 3, deep=True, placement="pilot"),
    "adapter": lambda vit: P.attach_adapter(vit, 8),
    "ssf": P.attach_ssf,
    "prefix": lambda vit: P.attach_prefix(vit, (0, 2), 3),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny ViT gains nothing from threads, and on a busy 2-CPU machine their spinning makes
    each forward ~100x slower; the previous setting is restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3,
                             num_classes=0, **kwargs).eval()


@pytest.fixture
def vit() -> VisionTransformer:
    return tiny_vit()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def vit_b() -> VisionTransformer:
    with torch.device("meta"):  # shapes only: parameter counts need no weights
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)


@torch.no_grad()
def out(vit, x) -> torch.Tensor:
    return vit(x)


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name,options,expected", [
    ("vpt_shallow", {"num_tokens": 5}, 3_840), ("vpt_deep", {"num_tokens": 5}, 46_080),
    ("vpt_deep", {"num_tokens": 30}, 276_480), ("adapter", {"bottleneck": 64}, 1_189_632),
    ("adapter", {"bottleneck": 16}, 304_320), ("ssf", {}, 205_824)])
def test_parameter_counts_vit_b16(vit_b, name, options, expected):
    module = P.attach(vit_b, name, **options)
    assert P.count_parameters(module) == expected
    P.detach(vit_b, module)


@pytest.mark.parametrize("blocks,length,expected", [((0, 1), 5, 15_360),  # DualPrompt G
                                                    ((0, 1, 2, 3, 4), 10, 76_800),  # LAE
                                                    ((0, 1, 2, 3, 4), 5, 38_400)])  # HiDe/task
def test_prefix_parameter_counts_vit_b16(vit_b, blocks, length, expected):
    prefix = P.attach_prefix(vit_b, blocks, length)
    assert P.count_parameters(prefix) == expected
    P.detach(vit_b, prefix)


def test_ssf_places_follow_pilot(vit_b):
    sites = P.ssf_sites(vit_b)
    assert len(sites) == 2 + 6 * 12
    assert sites["blocks.0.attn.qkv"] == 3 * 768 and sites["blocks.11.mlp.fc1"] == 4 * 768


def test_count_parameters_trainable_only(vit):
    assert P.count_parameters(vit.requires_grad_(False)) == 0
    assert P.count_parameters(vit, trainable_only=False) > 0


# ----------------------------------------------------------------------------- identity at start


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("placement", ["official", "pilot"])
def test_vpt_without_tokens_is_identity(vit, x, deep, placement):
    before = out(vit, x)
    P.attach_vpt(vit, 0, deep=deep, placement=placement)
    assert torch.equal(out(vit, x), before)


def test_adapter_is_identity_at_init_and_then_learns(vit, x):
    before = out(vit, x)
    adapters = P.attach_adapter(vit, 8)
    assert torch.equal(out(vit, x), before)
    torch.nn.init.normal_(adapters.adapters[1].up.weight)
    assert not torch.allclose(out(vit, x), before)


def test_adapter_runs_parallel_to_the_mlp_on_its_input(vit, x):
    adapters = P.attach_adapter(vit, 8)
    adapter, block = adapters.adapters[0], unwrap(vit.blocks[0])
    torch.nn.init.normal_(adapter.up.weight)
    seen = {}
    adapter.register_forward_pre_hook(lambda m, a: seen.setdefault("adapter", a[0]))
    block.norm2.register_forward_pre_hook(lambda m, a: seen.setdefault("norm2", a[0]))
    vit.blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("block", a[0]))
    vit.blocks[0].register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    out(vit, x)
    assert seen["adapter"] is seen["norm2"]  # x, not norm2(x)
    with torch.no_grad():
        expected = block(seen["block"]) + 0.1 * adapter.up(adapter.down(seen["norm2"]).relu())
    torch.testing.assert_close(seen["out"], expected)


def test_ssf_identity_init_and_normal_init(vit, x):
    before = out(vit, x)
    ssf = P.attach_ssf(vit, init="identity")
    assert torch.equal(out(vit, x), before)
    P.detach(vit, ssf)
    ssf = P.attach_ssf(vit)
    scales = torch.cat([s.scale for s in ssf.sites.values()])
    assert abs(scales.mean().item() - 1) < 0.01 and 0.015 < scales.std().item() < 0.025
    assert not torch.allclose(out(vit, x), before)


def test_ssf_sits_after_each_place(vit, x):
    ssf = P.attach_ssf(vit, init="identity")
    seen = {}
    fc1 = unwrap(vit.blocks[1].mlp.fc1)
    fc1.register_forward_hook(lambda m, i, o: seen.setdefault("fc1", o))
    vit.blocks[1].mlp.act.register_forward_hook(lambda m, i, o: seen.setdefault("act_in", i[0]))
    site = ssf.sites["blocks_1_mlp_fc1"]
    torch.nn.init.normal_(site.scale)
    out(vit, x)
    torch.testing.assert_close(seen["act_in"], seen["fc1"] * site.scale + site.shift)


# ----------------------------------------------------------------------------- VPT


def _block_input(vit, x, index) -> torch.Tensor:
    seen = []
    hook = unwrap(vit.blocks[index]).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    out(vit, x)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("placement", ["official", "pilot"])
def test_vpt_placement_and_deep_replacement(vit, x, placement):
    vpt = P.attach_vpt(vit, 3, deep=True, placement=placement)
    torch.nn.init.normal_(vpt.prompts)
    for layer in (0, 2):
        tokens = _block_input(vit, x, layer)  # (B, 1+16+3, D)
        assert tokens.shape == (B, 1 + 16 + 3, 48)
        at = slice(1, 4) if placement == "official" else slice(-3, None)
        assert torch.equal(tokens[:, at], vpt.prompts[layer].expand(B, -1, -1))
    assert vit.forward_features(x).shape == (B, 17, 48)  # prompts dropped before the norm
    assert out(vit, x).shape == (B, 48)


def test_vpt_init_official_uniform_pilot_zero(vit):
    official = P.attach_vpt(vit, 50)
    bound = math.sqrt(6 / (3 * 8 * 8 + 48))
    assert official.prompts.abs().max() <= bound and official.prompts.abs().max() > 0.9 * bound
    assert not P.attach_vpt(tiny_vit(), 5, placement="pilot").prompts.any()


def test_vpt_placements_differ_only_by_init(x):
    """Prompts carry no position and attention is permutation-equivariant, so with equal prompts
    both placements give the same CLS feature; the placements differ by their init."""
    a, b = tiny_vit(), tiny_vit()
    official = P.attach_vpt(a, 3, deep=True)
    pilot = P.attach_vpt(b, 3, deep=True, placement="pilot")
    assert not torch.allclose(out(a, x), out(b, x))
    pilot.prompts.data.copy_(official.prompts.data)
    torch.testing.assert_close(out(a, x), out(b, x))


def test_vpt_deep_differs_from_shallow(x):
    a, b = tiny_vit(), tiny_vit()
    shallow, deep = P.attach_vpt(a, 3), P.attach_vpt(b, 3, deep=True)
    deep.prompts.data[0] = shallow.prompts.data[0]
    assert deep.prompts.shape == (3, 3, 48) and shallow.prompts.shape == (1, 3, 48)
    assert not torch.allclose(out(a, x), out(b, x))


def test_vpt_drops_prompts_before_average_pooling(x):
    vit = tiny_vit(global_pool="avg")
    before = out(vit, x)
    P.attach_vpt(vit, 0)
    assert torch.equal(out(vit, x), before)
    vit = tiny_vit(global_pool="avg")
    P.attach_vpt(vit, 4)
    assert vit.forward_features(x).shape == (B, 17, 48) and out(vit, x).shape == (B, 48)


# ----------------------------------------------------------------------------- prefix


def test_prefix_empty_is_identity_and_nonzero_changes(vit, x):
    before = out(vit, x)
    P.attach_prefix(vit, (0, 1, 2))
    assert torch.equal(out(vit, x), before)
    empty = torch.zeros(B, 2, 0, 48)
    with torch.no_grad():
        torch.testing.assert_close(P.forward_with_prefix(vit, x, {1: empty}), before,
                                   rtol=0, atol=1e-6)
        changed = P.forward_with_prefix(vit, x, {1: torch.randn(B, 2, 4, 48)})
    assert changed.shape == before.shape and not torch.allclose(changed, before)
    assert torch.equal(out(vit, x), before)  # nothing left behind after the call
    assert not any(m._forward_pre_hooks for m in vit.modules())


def test_prefix_is_per_sample(vit, x):
    P.attach_prefix(vit, (0, 2))
    prefix = torch.randn(B, 2, 5, 48)
    with torch.no_grad():
        full = P.forward_with_prefix(vit, x, {0: prefix, 2: prefix})
        alone = P.forward_with_prefix(vit, x[1:2], {0: prefix[1:2], 2: prefix[1:2]})
        prefix[0] += 1.0
        other = P.forward_with_prefix(vit, x, {0: prefix, 2: prefix})
    torch.testing.assert_close(alone[0], full[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(other[1:], full[1:]) and not torch.allclose(other[0], full[0])


def test_prefix_attention_matches_explicit_formula(vit):
    attn = vit.blocks[0].attn
    tokens, prefix = torch.randn(2, 5, 48), torch.randn(2, 2, 3, 48)
    q, k, v = attn.qkv(tokens).reshape(2, 5, 3, 3, 16).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
    pk, pv = prefix.reshape(2, 2, 3, 3, 16).permute(1, 0, 3, 2, 4)  # (B, H, L, hd)
    k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)  # (B, H, L+N, hd)
    weights = (q @ k.transpose(-1, -2) / 4.0).softmax(-1)  # (B, H, N, L+N)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 48))  # (B, N, D)
    torch.testing.assert_close(P.prefix_attention(attn, tokens, prefix), expected)


def test_learned_prefix_is_default_and_supplied_one_replaces_it(vit, x):
    prefix = P.attach_prefix(vit, (1,), 4)
    with torch.no_grad():
        own = out(vit, x)
        supplied = P.forward_with_prefix(vit, x, prefix.prefixes(B))
        other = P.forward_with_prefix(vit, x, {1: torch.zeros(B, 2, 4, 48)})
    torch.testing.assert_close(own, supplied, rtol=0, atol=0)
    assert not torch.allclose(own, other)


def test_prefix_errors(vit, x):
    with pytest.raises(ValueError, match="blocks"):
        P.attach_prefix(vit, (0, 3))
    P.attach_prefix(vit, (0,))
    with pytest.raises(ValueError, match="no PrefixAttention"):
        P.forward_with_prefix(vit, x, {2: torch.zeros(B, 2, 1, 48)})
    with pytest.raises(ValueError, match="prefix must be"):
        P.forward_with_prefix(vit, x, {0: torch.zeros(B + 1, 2, 1, 48)})
    assert not any(m._forward_pre_hooks for m in vit.modules())


# ----------------------------------------------------------------------------- every module


@pytest.mark.parametrize("kind", sorted(ATTACH))
def test_detach_restores_exactly(vit, x, kind):
    before, keys = out(vit, x), list(vit.state_dict())
    modules = dict(vit.named_modules())
    module = ATTACH[kind](vit)
    assert any(".peft." in k for k in vit.state_dict())  # PEFT parameters hash with the ViT
    P.detach(vit, module)
    assert list(vit.state_dict()) == keys
    assert all(modules[name] is m for name, m in vit.named_modules())
    assert torch.equal(out(vit, x), before)
    with pytest.raises(ValueError, match="not attached"):
        P.detach(vit, module)


@pytest.mark.parametrize("kind", sorted(ATTACH))
def test_gradients_reach_only_the_peft_parameters(vit, x, kind):
    vit.requires_grad_(False)
    module = ATTACH[kind](vit)
    vit.train()
    vit(x).square().sum().backward()
    mine = {id(p) for p in module.parameters()}
    assert mine and all(p.grad is not None for p in module.parameters())
    assert all(p.grad is None for p in vit.parameters() if id(p) not in mine)
    assert P.count_parameters(vit) == P.count_parameters(module)


@pytest.mark.parametrize("kind", sorted(ATTACH))
def test_other_instances_are_untouched(x, kind):
    a, b = tiny_vit(), tiny_vit()
    before = out(b, x)
    ATTACH[kind](a)
    assert all(type(blk) is Block for blk in b.blocks)
    assert type(b.norm) is type(unwrap(a.norm)) and type(b.blocks[0].attn.qkv) is torch.nn.Linear
    assert torch.equal(out(b, x), before)
    assert torch.equal(out(tiny_vit(), x), before)


@pytest.mark.parametrize("kind", sorted(ATTACH))
def test_attaching_twice_is_refused(vit, kind):
    ATTACH[kind](vit)
    with pytest.raises(ValueError, match="already carries"):
        ATTACH[kind](vit)


@pytest.mark.parametrize("order", [("ssf", "adapter", "vpt_deep", "prefix"),
                                   ("prefix", "vpt_deep", "adapter", "ssf")])
def test_modules_compose_and_detach_in_any_order(vit, x, order):
    before = out(vit, x)
    mods = [ATTACH[kind](vit) for kind in order]
    for m in mods:
        torch.nn.init.normal_(next(m.parameters()), std=0.1)
    assert not torch.allclose(out(vit, x), before)
    for i in (2, 0, 3, 1):
        P.detach(vit, mods[i])
    assert torch.equal(out(vit, x), before)


def test_adapter_sets_side_by_side_on_one_trunk(vit, x):
    """EASE: one adapter set per task, run in turn on one frozen trunk."""
    before = out(vit, x)
    first = P.attach_adapter(vit, 8)
    P.detach(vit, first)
    second = copy.deepcopy(first)
    for s in (first, second):
        torch.nn.init.normal_(s.adapters[0].up.weight)
    with P.injected(vit, first):
        y1 = out(vit, x)
    with P.injected(vit, second):
        y2 = out(vit, x)
    with P.injected(vit, first):
        assert torch.equal(out(vit, x), y1)
    assert not torch.allclose(y1, y2) and torch.equal(out(vit, x), before)


def test_deepcopy_of_an_attached_vit_owns_its_peft(vit, x):
    vpt = P.attach_vpt(vit, 3)
    twin = copy.deepcopy(vit)
    before = out(twin, x)
    torch.nn.init.normal_(vpt.prompts)
    assert torch.equal(out(twin, x), before) and not torch.equal(out(vit, x), before)


def test_registry(vit):
    vpt = P.attach(vit, "vpt_deep", num_tokens=2)
    assert vpt.prompts.shape == (3, 2, 48)
    assert set(P.PEFT_MODULES) == {"adapter", "ssf", "vpt_deep", "vpt_shallow"}
    with pytest.raises(ConfigError, match="choose one of"):
        P.attach(vit, "lora")
    with pytest.raises(TypeError):
        P.attach(tiny_vit(), "ssf", bottleneck=3)
    with pytest.raises(TypeError, match="VisionTransformer"):
        P.attach_adapter(torch.nn.Linear(2, 2))


def test_load_without_trunk_accepts_only_a_missing_frozen_copy():
    from retain.layers.inject import load_without_trunk, without_trunk

    def net():
        n = torch.nn.Module()
        n.vit, n.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)
        return n

    state = without_trunk(net())
    assert set(state) == {"head.weight", "head.bias"}
    fresh = net()
    load_without_trunk(fresh, state)
    assert torch.equal(fresh.head.weight, state["head.weight"])
    with pytest.raises(KeyError, match="extra"):
        load_without_trunk(net(), state | {"extra": torch.zeros(1)})
    with pytest.raises(KeyError, match="head.bias"):
        load_without_trunk(net(), {"head.weight": state["head.weight"]})
