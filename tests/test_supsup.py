"""SupSup: masks (exact density, straight-through gradients), per-sample alpha gradients against
autograd, per-task BN isolation, task inference over learned slots only, and end-to-end runs on
MNIST-5k (GG on TIL-B0Inc2; GN and NNs on Permuted3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import retain
from retain.backbones import create_backbone
from retain.context import Context
from retain.evaluation import evaluate
from retain.layers.masked import (
    MaskedConv2d,
    MaskedLinear,
    MultitaskBatchNorm,
    SupermaskNet,
    ThresholdMask,
    TopKMask,
    entropy,
    pack_masks,
    superfluous_logsumexp,
    unpack_masks,
)
from retain.layers.mlp import build_net
from retain.methods import create_method
from retain.scenarios import make_scenario


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks: one thread is faster, and robust to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mnist():
    return retain.create_dataset("mnist5k").load()


def ctx() -> Context:
    return Context(batch_size=128, seed=1993)


def test_topk_mask_keeps_exactly_k_largest_and_passes_gradient_straight_through():
    scores = torch.randn(7, 13, requires_grad=True)
    mask = TopKMask.apply(scores.abs(), 0.3)
    kept = 91 - int(0.7 * 91)  # official GetSubnet: n - floor((1 - density) n)
    assert mask.sum() == kept
    assert mask[scores.abs() >= scores.abs().flatten().topk(kept).values[-1]].all()
    c = torch.randn(7, 13)
    (mask * c).sum().backward()
    torch.testing.assert_close(scores.grad, c * scores.detach().sign())  # through |S|
    tied = TopKMask.apply(torch.ones(10, 10), 0.25)
    assert tied.sum() == 25  # exact density even when every score ties


def test_threshold_mask_is_sign_with_identity_gradient():
    scores = torch.randn(50, requires_grad=True)
    mask = ThresholdMask.apply(scores)
    assert torch.equal(mask, (scores >= 0).float())
    c = torch.randn(50)
    (mask * c).sum().backward()
    torch.testing.assert_close(scores.grad, c)


def test_frozen_masks_are_bool_and_pack_to_one_bit():
    layer = MaskedLinear(20, 9, mask="topk", density=0.5)
    layer.reset(3)
    assert set(layer.weight.abs().unique().tolist()) == pytest.approx([2**0.5 / 20**0.5])
    layer.add_slot(0)
    expected = layer.mask(0).detach().bool()
    layer.freeze(0)
    assert layer.frozen(0).dtype == torch.bool and torch.equal(layer.frozen(0), expected)
    assert len(layer.scores) == 0 and layer.frozen(0).sum() == 90
    packed = pack_masks([layer.frozen(0)])
    assert packed.dtype == torch.uint8 and packed.numel() == 23  # ceil(180 / 8)
    assert torch.equal(unpack_masks(packed, layer.shape)[0], expected)


def small_net(batchnorm: bool, name: str = "fc300x100") -> SupermaskNet:
    shape = (3, 8, 8) if name == "resnet18_gem" else (1, 4, 4)
    body = build_net(name, shape, 12, linear=MaskedLinear, conv=MaskedConv2d,
                     norm=MultitaskBatchNorm if batchnorm else None)
    net = SupermaskNet(body, seed=5)
    for slot in range(3):
        net.add_slot(slot)
        for norm in net.norms():  # distinct statistics per slot
            norm.get_buffer(f"mean_{slot}").normal_()
        net.freeze(slot)
    return net.eval()


@pytest.mark.parametrize("batchnorm,name", [(False, "fc300x100"), (True, "fc300x100"),
                                            (True, "resnet18_gem")])
@pytest.mark.parametrize("objective", [entropy, superfluous_logsumexp(4)])
def test_alpha_gradients_equal_autograd_sample_by_sample(batchnorm, name, objective):
    """Also through GEM's residual blocks: every masked layer is linear in its own weight."""
    net = small_net(batchnorm, name)
    x = torch.randn(5, 3, 8, 8) if name == "resnet18_gem" else torch.randn(5, 1, 4, 4)
    alphas = torch.tensor([0.5, 0.0, 0.5])  # slot 1 left out of the superposition
    g = net.alpha_gradients(x, alphas, objective)  # (5, 3)
    for n in range(5):
        leaf = alphas.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(objective(net(x[n : n + 1], leaf)).sum(), leaf)
        torch.testing.assert_close(g[n, [0, 2]], expected[[0, 2]], rtol=1e-4, atol=1e-6)
    assert (g[:, 1] == 0).all()


def tiny_til(bundle, name="TIL-B0Inc2"):
    return make_scenario(bundle, name)


def test_learning_a_task_leaves_earlier_tasks_bit_identical_with_per_task_bn(bundle):
    backbone = create_backbone("pixels", image_size=16)
    m = create_method("supsup", backbone, batchnorm=True, epochs=5, lr=0.01, batch_size=8)
    stream, c = tiny_til(bundle), ctx()
    m.learn(stream[0], c)
    ids = np.zeros(len(stream[0].test), dtype=np.int64)
    before = m.predict(stream[0].test, c, ids)
    mean0 = m.net_.norms()[0].stats(0)[0].clone()
    m.learn(stream[1], c)
    assert torch.equal(m.predict(stream[0].test, c, ids)[:, :2], before)  # columns: task 0
    assert torch.equal(m.net_.norms()[0].stats(0)[0], mean0)
    assert not torch.equal(m.net_.norms()[0].stats(1)[0], mean0)  # task 1 has its own
    copy = create_method("supsup", backbone, batchnorm=True)
    copy.load_state_dict(m.state_dict())  # per-task statistics round-trip
    ids = np.ones(len(stream[1].test), dtype=np.int64)
    assert torch.equal(copy.predict(stream[1].test, c, ids), m.predict(stream[1].test, c, ids))


def test_state_refuses_frozen_weights_regenerated_differently(bundle, monkeypatch):
    """The weights come back from the seed; their SHA-256 in the state must match, or loading
    stops with a StateError (a generator that draws other numbers)."""
    import hashlib

    import retain.layers.masked as masked
    from retain.errors import StateError

    backbone = create_backbone("pixels", image_size=16)
    m = create_method("supsup", backbone, epochs=1, batch_size=8)
    m.learn(tiny_til(bundle)[0], ctx())
    state = m.state_dict()
    raw = b"".join(layer.weight.numpy().tobytes() for layer in m.net_.masked_layers())
    assert bytes(state["weights_sha256"].tolist()) == hashlib.sha256(raw).digest()
    create_method("supsup", backbone).load_state_dict(state)  # same generator: loads
    create_method("supsup", backbone).load_state_dict(
        {k: v for k, v in state.items() if k != "weights_sha256"})  # older states: no check
    uniform = masked.seeded_uniform
    monkeypatch.setattr(masked, "seeded_uniform", lambda shape, bound, seed:
                        uniform(shape, bound, seed + 1))  # another generator's numbers
    with pytest.raises(StateError, match="regenerates other frozen weights"):
        create_method("supsup", backbone).load_state_dict(state)


def test_gem_resnet18_of_masked_layers_matches_gem_and_isolates_tasks(bundle):
    """SupSup's GEMResNet18 (SplitCIFAR100): the masked network has the plain reduced
    ResNet-18's conv weights (nf 20) plus a bias-free head; per-task BN keeps task 0 intact."""
    from retain.layers.resnet import ReducedResNet18

    backbone = create_backbone("pixels_rgb", image_size=16)
    m = create_method("supsup", backbone, net="resnet18_gem", output_size=5, mask="topk",
                      batchnorm=True, epochs=2, lr=0.01, batch_size=8)
    stream, c = tiny_til(bundle), ctx()
    m.learn(stream[0], c)
    convs = sum(p.numel() for n, p in ReducedResNet18().named_parameters() if "conv" in n
                or "shortcut.0" in n)
    assert sum(x.num_weights for x in m.net_.masked_layers()) == convs + 160 * 5
    assert len(m.net_.norms()) == 1 + 8 * 2 + 3  # stem, two per block, three shortcuts
    ids = np.zeros(len(stream[0].test), dtype=np.int64)
    before = m.predict(stream[0].test, c, ids)
    m.learn(stream[1], c)
    assert torch.equal(m.predict(stream[0].test, c, ids)[:, :2], before)
    layer = m.net_.masked_layers()[1]
    assert layer.frozen(0).float().mean() == pytest.approx(0.5, abs=1e-3)  # top-k density


def test_one_shot_never_picks_an_unlearned_slot():
    m = create_method("supsup_gn", create_backbone("pixels", image_size=16))
    g = torch.tensor([[0.5, 0.2, 0.0, -0.3]])  # slots 2 and 3: not learned (gradient 0 or less)
    pattern = torch.tensor([True, True, False, False])
    assert m._survivors(g, pattern).tolist() == [[False, True, False, False]]
    m.inference = "binary"
    g = torch.tensor([[0.5, 0.2, 0.1, 0.7, -1.0]])
    pattern = torch.tensor([True, True, True, True, False])
    assert m._survivors(g, pattern).tolist() == [[False, True, True, False, False]]


def test_gg_end_to_end_on_split_mnist(mnist):
    stream, c = make_scenario(mnist, "TIL-B0Inc2"), ctx()
    m = create_method("supsup", create_backbone("pixels"), epochs=2, lr=1e-3)
    for task in stream:
        m.learn(task, c)
    correct, total = evaluate(m, stream[:], c, 4)
    assert (correct / total).min() > 0.93 and correct.sum() / total.sum() > 0.96
    state = m.state_dict()
    weights = sum(layer.num_weights for layer in m.net_.masked_layers())
    mask_bytes = sum(v.numel() for k, v in state.items() if k.startswith("masks."))
    assert mask_bytes == sum(-(-layer.num_weights // 8) * 5 for layer in m.net_.masked_layers())
    assert m.parameter_counts() == {"trainable": 5 * weights, "total": 6 * weights}


@pytest.fixture(scope="module")
def permuted_gn(mnist):
    stream, c = make_scenario(mnist, "Permuted3", seed=0), ctx()
    m = create_method("supsup_gn", create_backbone("pixels"))  # the notebook's settings
    for task in stream:
        m.learn(task, c)
    return stream, m


def test_gn_infers_permutations_from_single_images(permuted_gn):
    stream, m = permuted_gn
    c = ctx()
    for task in stream:
        test = task.test.subset(np.arange(200))
        assert (m.infer_task(test, c) == task.id).mean() > 0.97
    correct, total = evaluate(m, stream[:], c, 2)
    assert (correct / total).min() > 0.75  # 1 epoch on 4,000 images (notebook: 92% on 60k)


@pytest.mark.parametrize("options", [{"inference": "binary"}, {"objective": "superfluous"},
                                     {"per_batch": True, "batch_size": 50}])
def test_gn_inference_variants(permuted_gn, options):
    stream, trained = permuted_gn
    m = create_method("supsup_gn", create_backbone("pixels"), **options)
    m.load_state_dict(trained.state_dict())
    test = stream[1].test.subset(np.arange(150))
    inferred = m.infer_task(test, ctx())
    assert (inferred == 1).mean() > 0.95
    if options.get("per_batch"):  # one inference per batch of 50, from its first image
        assert all(len(set(inferred[s : s + 50])) == 1 for s in range(0, 150, 50))


def test_nns_allocates_a_mask_at_each_new_permutation(mnist):
    stream, c = make_scenario(mnist, "Permuted3", seed=0), ctx()
    m = create_method("supsup_gn", create_backbone("pixels"), mode="NNs", nns_every=32)
    for task in stream:  # 32 steps per task: a detection at every task start, as officially
        m.learn(task, c)
    assert m.slot_task_ == [0, 1, 2]  # one new mask per permutation, none in between
    test = stream[2].test.subset(np.arange(200))
    assert (m.infer_task(test, c) == 2).mean() > 0.95
    copy = create_method("supsup_gn", create_backbone("pixels"), mode="NNs")
    copy.load_state_dict(m.state_dict())  # the task-free masks stay trainable: float scores
    assert torch.equal(copy.predict(test, c), m.predict(test, c))


def test_modes_belong_to_their_registered_name(bundle):
    backbone = create_backbone("pixels", image_size=16)
    with pytest.raises(retain.errors.ConfigError, match="supsup_gn"):
        create_method("supsup", backbone, mode="GN").learn(tiny_til(bundle)[0], ctx())
    with pytest.raises(retain.errors.ConfigError, match="use supsup "):
        create_method("supsup_gn", backbone, mode="GG").learn(tiny_til(bundle)[0], ctx())


def test_nns_on_a_task_free_stream_finds_the_boundaries_itself(mnist):
    """Unmarked segments of 500 images (8 per task, 4 batches each): the detection count runs
    across calls, so the masks start where the permutation changes, not at every segment."""
    stream, c = make_scenario(mnist, "TaskFree500:Permuted3", seed=0), ctx()
    m = create_method("supsup_gn", create_backbone("pixels"), mode="NNs", nns_every=32)
    for t in range(len(stream)):
        for segment in stream.segments(t):
            assert segment.free and len(segment.test) == 0
            m.learn(segment, c)
    assert m.slot_task_ == [0, 8, 16]  # the segments that opened tasks 0, 1, 2
    assert m.nns_steps_ == 3 * 8 * 4
    test = stream[1].test.subset(np.arange(200))
    assert (stream.task_of(m.infer_task(test, c)) == 1).mean() > 0.95
    copy = create_method("supsup_gn", create_backbone("pixels"), mode="NNs", nns_every=32)
    copy.load_state_dict(m.state_dict())
    assert (copy.nns_steps_, copy.nns_slot_) == (m.nns_steps_, m.nns_slot_)


def test_gn_refuses_a_task_free_segment(mnist):
    segment = make_scenario(mnist, "TaskFree500:Permuted2", seed=0).segments(0)[0]
    m = create_method("supsup_gn", create_backbone("pixels"), mode="GN")
    with pytest.raises(retain.errors.ConfigError, match="mode=NNs"):
        m.learn(segment, ctx())
