"""Numerics of the foundation methods against closed forms and their definitions."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from retain.context import Context
from retain.features import embed
from retain.methods import create_method


def test_simplecil_prototypes_are_class_means_and_scores_are_cosines(tiny_vit, scenario):
    m, ctx = create_method("simplecil", tiny_vit), Context()
    for task in scenario[:2]:
        m.learn(task, ctx)
    protos = m.state_dict()["prototypes"]  # (4, D)
    for task in scenario[:2]:
        f = embed(tiny_vit, task.train, task.train.index, device="cpu")
        for c in task.new_classes:
            torch.testing.assert_close(protos[c], f[torch.from_numpy(task.train.targets == c)]
                                       .mean(0), rtol=1e-5, atol=1e-6)
    test = scenario[1].test
    f = embed(tiny_vit, test, test.index, device="cpu")
    expected = F.normalize(f, dim=1) @ F.normalize(protos, dim=1).T  # (N, 4)
    torch.testing.assert_close(m.predict(test, ctx), expected, rtol=1e-5, atol=1e-6)


def test_simplecil_leaves_old_prototypes_untouched(tiny_vit, scenario):
    m, ctx = create_method("simplecil", tiny_vit), Context()
    m.learn(scenario[0], ctx)
    first = m.state_dict()["prototypes"].clone()
    m.learn(scenario[1], ctx)
    assert torch.equal(m.state_dict()["prototypes"][:2], first)


def test_finetune_forgets_and_joint_remembers(tiny_vit, scenario):
    """The bounds behave as bounds: on the last stage joint beats finetune on old tasks."""
    ctx = Context(batch_size=16)
    params = {"epochs": 8, "lr": 0.05, "batch_size": 4}
    ft, jt = create_method("finetune", tiny_vit, **params), create_method("joint", tiny_vit,
                                                                             **params)
    for task in scenario:
        ft.learn(task, ctx)
        jt.learn(task, ctx)
    old = scenario[0].test
    acc = {n: float((m.predict(old, ctx).argmax(1).numpy() == old.targets).mean())
           for n, m in (("ft", ft), ("joint", jt))}
    assert acc["joint"] > acc["ft"] + 0.3, acc
    assert len(jt.seen_) == sum(len(t.train) for t in scenario)


def test_finetune_on_frozen_features_is_a_sequential_linear_probe(tiny_vit, scenario):
    m = create_method("finetune", tiny_vit, freeze_backbone=True, epochs=5, lr=0.1)
    ctx = Context()
    m.learn(scenario[0], ctx)
    assert m.parameter_counts()["trainable"] == 2 * 48 + 2
    assert ctx.cache.images_embedded == len(scenario[0].train)
    assert np.isfinite(m.predict(scenario[0].test, ctx).numpy()).all()
