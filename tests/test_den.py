"""DEN: expansion when the loss stays above the threshold, deletion of dead new units, timestamp
slicing, split/duplication of drifted units, multi-class selection, the proximal steps
(``retain.layers.sparse``), AUROC (``retain.metrics``), and an end-to-end run on MNIST-5k
TIL-B0Inc2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import retain
from retain.backbones import create_backbone
from retain.context import Context
from retain.evaluation import evaluate
from retain.layers.sparse import group_soft_threshold_, reachable_units, soft_threshold_
from retain.methods import create_method
from retain.metrics import mean_class_auroc, roc_auc
from retain.scenarios import make_scenario


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small MLPs: one thread is faster, and robust to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ctx() -> Context:
    return Context(batch_size=64, seed=1993)


def den(**kw):
    params = {"hidden": (24, 12), "steps": 40, "batch_size": 8} | kw
    return create_method("den", create_backbone("pixels", image_size=16), **params)


def data_of(m, task, seed=0):
    x = m._inputs(task.train)
    local = {c: i for i, c in enumerate(task.classes)}
    y = torch.tensor([local[int(c)] for c in task.train.targets])
    return x, y, torch.Generator().manual_seed(seed)


def test_expansion_adds_units_only_when_the_loss_stays_above_threshold(bundle):
    stream = make_scenario(bundle, "TIL-B0Inc2")
    grow, keep = den(loss_threshold=0.0, split_threshold=1e9), den(loss_threshold=1e9)
    for m in (grow, keep):
        for task in stream[:2]:
            m.learn(task, ctx())
    assert grow.stamps_ == [(24, 12), (34, 22)]  # k = 10 units per hidden layer
    assert keep.stamps_[1][0] >= 24 and keep.stamps_[1][0] <= 34  # splits only, at most k
    assert grow.parameter_counts()["total"] > den().parameter_counts()["total"]


def test_new_units_with_all_zero_incoming_weights_are_deleted(bundle):
    stream = make_scenario(bundle, "TIL-B0Inc2")
    m = den(loss_threshold=0.0, split_threshold=1e9, group_lasso=100.0)
    calls = []
    expand = m._expand
    m._expand = lambda *a: calls.append(1) or expand(*a)
    for task in stream[:2]:
        m.learn(task, ctx())
    assert calls and m.stamps_[1] == (24, 12)  # expanded, then every new unit was zeroed


def test_timestamps_keep_old_tasks_outputs_unchanged(bundle):
    stream = make_scenario(bundle, "TIL-B0Inc2")
    m = den(loss_threshold=0.0)
    m.learn(stream[0], ctx())
    x0 = m._inputs(stream[0].test)
    before = m.task_logits(x0, 0)
    head = (torch.randn(12, 2), torch.zeros(2))
    m._expand(head, data_of(m, stream[1]))  # old trunk frozen, new units beyond the stamp
    assert m.weights_[0].shape[1] > 24
    assert torch.equal(m.task_logits(x0, 0), before)
    m.learn(stream[1], ctx())
    after = m.task_logits(x0, 0)
    for w, b, (i, o) in zip(m.weights_, m.biases_, [(256, 24), (24, 12)], strict=True):
        w[i:] += torch.randn_like(w[i:])  # everything task 0's timestamp leaves out
        w[:, o:] += torch.randn_like(w[:, o:])
        b[o:] += 1.0
    assert torch.equal(m.task_logits(x0, 0), after)


def test_split_restores_drifted_units_and_appends_their_copies(bundle):
    stream = make_scenario(bundle, "TIL-B0Inc2")
    m = den(split_threshold=0.5, expand_units=1)
    m.learn(stream[0], ctx())
    prev = ([w.clone() for w in m.weights_], [b.clone() for b in m.biases_])
    m.weights_[0][:, 3] += 1.0  # drift 16 > 0.5: the most drifted
    m.weights_[0][:, 5] += 0.2  # drift 0.8 > 0.5, but k = 1
    drifted, up = m.weights_[0][:, 3].clone(), m.weights_[1][3].clone()
    m.steps = 0  # the structure only, no retraining
    head = m._split((torch.randn(12, 2), torch.zeros(2)), prev, data_of(m, stream[1]))
    w0, w1 = m.weights_
    assert w0.shape == (256, 25) and w1.shape == (25, 12) and head[0].shape == (12, 2)
    assert torch.equal(w0[:, 3], prev[0][0][:, 3]) and torch.equal(w0[:, 24], drifted)
    assert torch.equal(w0[:, 5], prev[0][0][:, 5] + 0.2)  # not split: k = 1
    assert torch.equal(w1[3], prev[0][1][3]) and torch.equal(w1[24], up)


def test_scaled_thresholds_follow_the_decayed_learning_rate(bundle):
    task = make_scenario(bundle, "TIL-B0Inc2")[0]  # 24 images: an epoch is 3 steps
    nonzero = {}
    for scale in (True, False):
        m = den(steps=300, l1=1e-3, scale_prox=scale)  # lr x0.95^100 by the end
        m.learn(task, ctx())
        nonzero[scale] = sum(int((w != 0).sum()) for w in m.weights_)
    assert nonzero[True] > 2 * nonzero[False]  # constant thresholds outlast the gradient


def test_selection_reads_every_output_of_the_head():
    m = den()
    m.weights_ = [torch.ones(6, 5), torch.zeros(5, 4)]
    m.weights_[1][2, 1] = 1.0  # unit 2 of layer 1 feeds unit 1 of layer 2
    head = torch.zeros(4, 3)
    head[1, 2] = 0.5  # only the third output uses unit 1 (column 0 is all zero)
    keep = reachable_units(m.weights_, head)
    assert keep[1].tolist() == [1] and keep[0].tolist() == [2]


def test_roc_auc_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.RandomState(0)
    scores, labels = rng.randint(0, 5, 300).astype(float), rng.rand(300) < 0.3  # with ties
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_mean_class_auroc_matches_scikit_learn_one_vs_rest():
    from sklearn.metrics import roc_auc_score

    rng = np.random.RandomState(1)
    labels = rng.randint(0, 4, 200)
    scores = rng.randn(200, 4) + 1.5 * np.eye(4)[labels]  # informative, not perfect
    scores[:, 2] = np.round(scores[:, 2])  # ties in one column
    expected = np.mean([roc_auc_score(labels == c, scores[:, c]) for c in range(4)])
    assert mean_class_auroc(scores, labels) == pytest.approx(expected)
    assert 0.7 < expected < 1.0


def test_l1_soft_threshold_by_hand():
    x = torch.tensor([[0.5, -0.05], [-2.0, 0.1]])
    soft_threshold_(x, 0.1)  # sign(x) max(|x| - 0.1, 0)
    assert torch.allclose(x, torch.tensor([[0.4, 0.0], [-1.9, 0.0]]))


def test_group_lasso_prox_shrinks_whole_columns_by_hand():
    w = torch.tensor([[3.0, 0.3, 0.0], [4.0, 0.4, 0.0]])  # column norms 5, 0.5, 0
    group_soft_threshold_(w, 1.0)  # w_g * max(0, 1 - 1 / ||w_g||)
    expected = torch.tensor([[3.0 * 0.8, 0.0, 0.0], [4.0 * 0.8, 0.0, 0.0]])
    assert torch.allclose(w, expected)  # the norm-0.5 column dies entirely, no NaN on zeros


def test_end_to_end_on_split_mnist():
    stream = make_scenario(retain.create_dataset("mnist5k").load(), "TIL-B0Inc2")
    m, c = create_method("den", create_backbone("pixels"), steps=100), ctx()
    totals = []
    for task in stream:
        m.learn(task, c)
        totals.append(m.parameter_counts()["total"])
    correct, total = evaluate(m, stream[:], c, 4)
    assert (correct / total).min() > 0.9
    assert totals == sorted(totals) and totals[-1] > totals[0]  # grows with the tasks
    test = stream[3].test
    assert m.auroc(test, c, np.full(len(test), 3))[3] > 0.95
    copy = create_method("den", create_backbone("pixels"))
    copy.load_state_dict(m.state_dict())
    ids = np.arange(len(test)) % 5
    assert torch.equal(copy.predict(test, c, ids), m.predict(test, c, ids))
