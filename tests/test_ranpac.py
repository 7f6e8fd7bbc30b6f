"""RanPAC: the ridge head equals a joint closed-form solve; λ as the official 80/20 search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retain.context import Context
from retain.evaluation import evaluate
from retain.features import embed
from retain.layers.ridge import RANPAC_LAMBDAS
from retain.methods import create_method


def test_head_is_the_joint_ridge_solution_over_all_tasks(tiny_vit, scenario):
    m, ctx = create_method("ranpac", tiny_vit, peft="none", projection_dim=64), Context()
    for task in scenario:
        m.learn(task, ctx)
    w_rand = m._projection()  # (D, M)
    hs, ys = [], []
    for task in scenario:
        f = embed(tiny_vit, task.train, task.train.index, device="cpu")
        hs.append(F.relu(f @ w_rand))
        ys.append(torch.from_numpy(task.train.targets))
    h, y = torch.cat(hs).double(), F.one_hot(torch.cat(ys), 6).double()
    lam = m.lambdas_[-1]
    direct = torch.linalg.solve(h.T @ h + lam * torch.eye(64, dtype=torch.float64), h.T @ y)
    rel = (m.weights_.double() - direct).norm() / direct.norm()
    assert rel < 1e-4
    test = scenario[2].test
    f = embed(tiny_vit, test, test.index, device="cpu")
    torch.testing.assert_close(m.predict(test, ctx), F.relu(f @ w_rand) @ m.weights_)


def test_lambda_is_the_official_80_20_choice(tiny_vit, scenario):
    ctx = Context()
    m = create_method("ranpac", tiny_vit, peft="none", projection_dim=64)
    task = scenario[0]
    m.learn(task, ctx)
    f = embed(tiny_vit, task.train, task.train.index, device="cpu")
    h = F.relu(f @ m._projection()).double()
    y = F.one_hot(torch.from_numpy(task.train.targets), 2).double()
    perm = torch.randperm(len(h), generator=ctx.generator(0, 8))
    cut = int(0.8 * len(h))
    tr, va = perm[:cut], perm[cut:]
    errors = []
    for lam in RANPAC_LAMBDAS:  # the official loop: one dense solve per candidate
        w = torch.linalg.solve(h[tr].T @ h[tr] + lam * torch.eye(64, dtype=torch.float64),
                               h[tr].T @ y[tr])
        errors.append(float(((h[va] @ w - y[va]) ** 2).mean()))
    assert m.lambdas_[0] == RANPAC_LAMBDAS[int(np.argmin(errors))]


def test_cosine_head_option(tiny_vit, scenario):
    ctx = Context()
    lin = create_method("ranpac", tiny_vit, peft="none", projection_dim=32)
    cos = create_method("ranpac", tiny_vit, peft="none", projection_dim=32, head="cosine")
    lin.learn(scenario[0], ctx)
    cos.learn(scenario[0], ctx)
    torch.testing.assert_close(lin.weights_, cos.weights_)
    z = cos.predict(scenario[0].test, ctx)
    assert z.abs().max() <= 1.0 + 1e-5


def test_vpt_is_ranpac_s_own(tiny_vit, scenario, monkeypatch):
    """inc_net.py: 5 zero-initialised tokens per block appended after the patch tokens."""
    import retain.adaptation as adaptation

    monkeypatch.setattr(adaptation, "fit", lambda *a, **k: [])  # the prompts as initialised
    m = create_method("ranpac", tiny_vit, peft="vpt_deep", epochs=1, projection_dim=8)
    m.learn(scenario[0], Context())
    vpt = m.tuned_
    assert vpt.placement == "pilot" and vpt.prompts.shape == (2, 5, 48)  # (blocks, p, D)
    assert not vpt.prompts.any()
    back = create_method("ranpac", tiny_vit, peft="vpt_deep", epochs=1, projection_dim=8)
    back.load_state_dict(m.state_dict())
    assert back.tuned_.placement == "pilot"


@pytest.mark.slow
def test_real_weights_beat_the_finetune_lower_bound():
    """EfficientNet-Lite0 (ImageNet) on a MNIST-5k subset, B0Inc2: RanPAC without adaptation
    must beat sequential fine-tuning of a linear head on the same frozen features."""
    from retain import ClassIncremental, create_backbone, create_dataset

    data = create_dataset("mnist5k").load()

    rng = np.random.RandomState(0)
    keep_tr = np.concatenate([rng.permutation(np.flatnonzero(data.train.targets == c))[:40]
                              for c in range(10)])
    keep_te = np.concatenate([rng.permutation(np.flatnonzero(data.test.targets == c))[:30]
                              for c in range(10)])
    from retain.datasets.base import DataBundle

    small = DataBundle("mnist5k-subset", data.train.subset(keep_tr), data.test.subset(keep_te),
                       data.class_names)
    sc = ClassIncremental(small, increment=2, seed=1993)
    bb = create_backbone("efficientnet_lite0", image_size=64)
    ctx = Context(batch_size=32)
    acc = {}
    for name, params in [("ranpac", {"peft": "none", "projection_dim": 2000}),
                         ("finetune", {"freeze_backbone": True, "epochs": 10, "lr": 0.05})]:
        m = create_method(name, bb, **params)
        for task in sc:
            m.learn(task, ctx)
        c, t = evaluate(m, sc[:], ctx, len(sc) - 1)
        acc[name] = c.sum() / t.sum()
    print(acc)
    assert acc["ranpac"] > acc["finetune"] + 0.2, acc
    assert acc["ranpac"] > 0.6, acc
