"""ZSCL: its loss terms, weight ensemble and schedule against hand computations, the reference
folder, and end-to-end runs on the tiny random CLIP (no real-weights test: the CLIP ViT-B/16
checkpoint cannot be obtained offline)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import retain.methods.zscl as Z
from retain.backbones import create_backbone
from retain.context import Context
from retain.errors import ConfigError
from retain.features import FeatureCache
from retain.layers.zscl import (
    distillation,
    merge_running_mean,
    read_reference,
    warmup_cosine,
    weight_l2,
)
from retain.methods import create_method

QUICK = {"iterations": 6, "lr": 1e-3, "batch_size": 4, "warmup": 2, "avg_freq": 2,
         "reference": "current"}


@pytest.fixture(scope="module")
def clip():
    return create_backbone("clip_tiny_random", image_size=16)


def fresh_ctx() -> Context:
    return Context(batch_size=16, seed=1993, cache=FeatureCache())


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def test_distillation_by_hand():
    t = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    s = torch.tensor([[0.0, 1.0, 1.0], [2.0, 0.0, -1.0]])
    T = 2.0
    p = np.exp(_log_softmax(t.numpy() / T))
    want = -(p * _log_softmax(s.numpy() / T)).sum(1).mean() * T**2
    assert distillation(t, s, T).item() == pytest.approx(want, rel=1e-6)
    # identical logits: the loss is T^2 times the teacher's entropy, its minimum over students
    ent = -(p * np.log(p)).sum(1).mean() * T**2
    assert distillation(t, t, T).item() == pytest.approx(ent, rel=1e-6)
    assert distillation(t, s, T).item() > ent


def test_weight_l2_by_hand():
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0]]))
        lin.bias.fill_(0.5)
    anchor = [torch.tensor([[0.0, -1.0]]), torch.tensor([2.0])]
    assert weight_l2(lin, anchor).item() == pytest.approx(1 + 1 + 2.25)
    weight_l2(lin, anchor).backward()  # d/dθ = 2 (θ - anchor)
    torch.testing.assert_close(lin.weight.grad, torch.tensor([[2.0, -2.0]]))


def test_weight_ensemble_is_the_running_mean_of_the_snapshots():
    torch.manual_seed(0)
    model, ensemble = nn.Linear(3, 2), nn.Linear(3, 2)
    ensemble.load_state_dict(model.state_dict())  # theta_WE starts at the initial weights
    snaps = [[p.detach().clone() for p in model.parameters()]]
    for n in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        snaps.append([p.detach().clone() for p in model.parameters()])
        merge_running_mean(model, ensemble, n)
    for i, q in enumerate(ensemble.parameters()):
        torch.testing.assert_close(q, torch.stack([s[i] for s in snaps]).mean(0))


def test_warmup_then_cosine_rate():
    f = warmup_cosine(warmup=2, steps=6)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert [f(s) for s in (2, 4, 6)] == pytest.approx([1.0, 0.5, 0.0])
    assert f(3) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_loss_by_hand_label_smoothing_l2_and_both_distillation_directions(clip):
    m = create_method("zscl", clip, label_smoothing=0.2, temperature=2.0, image_loss=0.7,
                      text_loss=0.3, l2=0.5)
    net = m._fresh()
    torch.manual_seed(0)
    with torch.no_grad():
        net.visual.head.weight.add_(0.1 * torch.randn_like(net.visual.head.weight))
    anchor = [p.detach().clone() + 0.01 for p in net.parameters()]
    x, rx = torch.randn(3, 3, 16, 16), torch.randn(4, 3, 16, 16)
    y = torch.tensor([0, 1, 1])
    tokens = net.text.tokenize(["a good photo of a cat.", "a good photo of a dog."])
    ref_img0 = nn.functional.normalize(torch.randn(4, 32), dim=-1)
    ref_txt0 = nn.functional.normalize(torch.randn(5, 32), dim=-1)
    got = m._loss(net, x, y, tokens, rx, ref_img0, ref_txt0, anchor).item()

    with torch.no_grad():
        s = net.text.logit_scale.exp().item()
        unit = lambda a: (a / a.norm(dim=-1, keepdim=True)).numpy().astype(np.float64)  # noqa: E731
        logits = s * unit(net.visual(x)) @ unit(net.text(tokens)).T  # (3, 2)
        cur = s * unit(net.visual(rx)) @ ref_txt0.numpy().T  # (4, 5)
        l2 = sum(((p - a) ** 2).sum().item()
                 for p, a in zip(net.parameters(), anchor, strict=True))
    logp = _log_softmax(logits)
    ce = np.mean(0.8 * -logp[np.arange(3), y.numpy()] + 0.2 * -logp.mean(1))
    ref = s * ref_img0.numpy() @ ref_txt0.numpy().T  # (4, 5)

    def d(t, u):
        p = np.exp(_log_softmax(t / 2))
        return -(p * _log_softmax(u / 2)).sum(1).mean() * 4

    want = ce + 0.5 * l2 + 0.7 * d(ref, cur) + 0.3 * d(ref.T, cur.T)
    assert got == pytest.approx(want, rel=1e-4)
    assert d(ref, cur) != pytest.approx(d(ref.T, cur.T), rel=1e-3)  # two distinct directions


def test_predictions_use_the_ensembled_weights(clip, scenario, monkeypatch):
    seen = []
    real = Z.merge_running_mean

    def record(model, ensemble, n):
        seen.append([p.detach().clone() for p in model.parameters()])
        real(model, ensemble, n)

    monkeypatch.setattr(Z, "merge_running_mean", record)
    m, ctx = create_method("zscl", clip, **QUICK), fresh_ctx()
    start = [p.detach().clone() for p in m._fresh().parameters()]
    m.learn(scenario[0], ctx)
    assert len(seen) == 3  # iterations 0, 2, 4
    for i, p in enumerate(m.net_.parameters()):
        torch.testing.assert_close(p, torch.stack([start[i]] + [s[i] for s in seen]).mean(0))
    # logits: s * cos(WE image tower, WE text tower on the seen class prompts)
    test = scenario[0].test
    x = clip.preprocess(test, np.arange(len(test)))
    with torch.no_grad():
        head = nn.functional.normalize(m.net_.text.encode_text(
            [f"a good photo of a {n}." for n in scenario[0].class_names]), dim=-1)
        img = nn.functional.normalize(m.net_.visual(x), dim=-1)
        want = m.net_.text.logit_scale.exp() * img @ head.T
    torch.testing.assert_close(m.predict(test, ctx), want, rtol=1e-4, atol=1e-5)
    # ...which differ from those of the last (non-averaged) weights
    last = Z.ClipPair(m._fresh().visual, m._fresh().text)
    with torch.no_grad():
        for p, q in zip(last.parameters(), seen[-1], strict=True):
            p.copy_(q)
        assert not torch.allclose(nn.functional.normalize(last.visual(x), dim=-1), img,
                                  atol=1e-4)


def test_prediction_of_a_sample_does_not_depend_on_its_batch(clip, scenario):
    m, ctx = create_method("zscl", clip, **QUICK), fresh_ctx()
    m.learn(scenario[0], ctx)
    test = scenario[0].test
    full = m.predict(test, ctx)
    rev = np.arange(len(test))[::-1].copy()
    torch.testing.assert_close(m.predict(test.subset(rev[:3]), ctx), full[rev[:3]],
                               rtol=1e-4, atol=1e-5)


def test_trains_whole_clip_except_the_logit_scale(clip, scenario):
    m, ctx = create_method("zscl", clip, **QUICK), fresh_ctx()
    m.learn(scenario[0], ctx)
    assert m.net_.text.logit_scale.item() == clip.text.logit_scale.item()
    for a, b in ((m.net_.visual, clip.model), (m.net_.text.transformer, clip.text.transformer)):
        assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(),
                                                                 strict=True))
    n_text = sum(p.numel() for p in clip.text.parameters())
    n_img = sum(p.numel() for p in clip.model.parameters())
    assert m.parameter_counts() == {"trainable": n_img + n_text - 1, "total": n_img + n_text}


def _reference_folder(root, n=3):
    lines = []
    for i in range(n):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(root / f"im{i}.png")
        lines.append(f"im{i}.png\ta picture number {i % 2}")
    (root / "captions.tsv").write_text("# image\tcaption\n" + "\n".join(lines) + "\n")


def test_reference_folder_format_and_errors(tmp_path):
    _reference_folder(tmp_path)
    split, captions = read_reference(tmp_path)
    assert len(split) == 3 and split.is_paths
    assert captions == ["a picture number 0", "a picture number 1"]  # distinct, in order
    with pytest.raises(ConfigError, match="captions.tsv"):
        read_reference(tmp_path / "missing")
    (tmp_path / "captions.tsv").write_text("nope.png\tcaption\n")
    with pytest.raises(ConfigError, match="does not exist"):
        read_reference(tmp_path)


def test_folder_reference_runs_and_missing_root_is_an_error(clip, scenario, tmp_path):
    with pytest.raises(ConfigError, match="reference_root"):
        create_method("zscl", clip, **(QUICK | {"reference": "folder"})).learn(
            scenario[0], fresh_ctx())
    _reference_folder(tmp_path)
    m = create_method("zscl", clip, **(QUICK | {"reference": "folder",
                                                 "reference_root": str(tmp_path)}))
    m.learn(scenario[0], fresh_ctx())
    assert torch.isfinite(m.predict(scenario[0].test, fresh_ctx())).all()


def test_needs_a_text_tower(tiny_vit, scenario):
    with pytest.raises(ConfigError, match="text tower"):
        create_method("zscl", tiny_vit, **QUICK).learn(scenario[0], fresh_ctx())


def test_end_to_end_with_every_term_on(clip, scenario):
    """Whole CLIP trained (both towers), distillation, L2 and the weight ensemble all on."""
    m, ctx = create_method("zscl", clip, iterations=100, lr=1e-4, batch_size=4, warmup=10,
                           avg_freq=10, l2=1e-3, image_loss=0.01, text_loss=0.01,
                           reference="current"), fresh_ctx()
    m.learn(scenario[0], ctx)
    test = scenario[0].test
    acc = (m.predict(test, ctx).argmax(1).numpy() == test.targets).mean()
    assert acc > 0.75
