"""One preprocessing path: arrays and files give the reference transform's pixels; augmentation
crops the original image; the transform is configurable; schedules step as declared."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_pre_hook

from retain.config import make_config
from retain.datasets.base import Split
from retain.errors import ConfigError
from retain.params import validate
from retain.transforms import Augment, Preprocess

tvt = pytest.importorskip("torchvision.transforms")
F = pytest.importorskip("torchvision.transforms.functional")


def images(shape, n=5, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def as_files(arrays: np.ndarray, folder) -> Split:
    paths = []
    for i, a in enumerate(arrays):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(a).save(paths[-1])
    return Split(np.array(paths, dtype=object), np.zeros(len(arrays), dtype=np.int64))


@pytest.mark.parametrize("shape", [(28, 28), (30, 22, 3)])  # gray MNIST-like, non-square RGB
@pytest.mark.parametrize("pre", [Preprocess(24, crop_pct=0.875, interpolation="bicubic"),
                                 Preprocess(40, (0.5,) * 3, (0.5,) * 3, 0.9, "bilinear"),
                                 Preprocess(22, crop_pct=1.0, interpolation="bilinear")])
def test_an_array_and_its_files_give_the_same_tensor(shape, pre, tmp_path):
    arrays = images(shape)
    pos = np.array([3, 0, 4])
    from_array = pre(Split(arrays, np.zeros(len(arrays))), pos)
    from_files = pre(as_files(arrays, tmp_path), pos)
    assert from_array.shape == (3, 3, pre.size, pre.size)
    assert torch.equal(from_array, from_files)


@pytest.mark.parametrize("size", [32, 224])
def test_pilot_test_transform_bit_for_bit(size):
    """LAMDA-PILOT build_transform(False): Resize(int(256/224·S), bicubic), CenterCrop, ToTensor."""
    arrays = images((28, 28, 3), n=3)
    ref = tvt.Compose([tvt.Resize(int((256 / 224) * size), interpolation=3),
                       tvt.CenterCrop(size), tvt.ToTensor()])
    want = torch.stack([ref(Image.fromarray(a)) for a in arrays])
    pre = Preprocess(size, (0, 0, 0), (1, 1, 1), crop_pct=224 / 256, interpolation="bicubic")
    assert torch.equal(pre(Split(arrays, np.zeros(3)), np.arange(3)), want)


def test_timm_eval_transform_bit_for_bit():
    """timm's eval transform: Resize(⌊S / crop_pct⌋), CenterCrop(S), ToTensor, Normalize."""
    from timm.data import create_transform

    arrays = images((37, 29, 3), n=3)
    ref = create_transform(33, is_training=False, crop_pct=0.9, interpolation="bilinear",
                           mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    want = torch.stack([ref(Image.fromarray(a)) for a in arrays])
    pre = Preprocess(33, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4), crop_pct=0.9, interpolation="bilinear")
    assert pre.resize_to == 36  # ⌊33 / 0.9⌋, not round(36.67)
    assert torch.equal(pre(Split(arrays, np.zeros(3)), np.arange(3)), want)


def test_random_resized_crop_cuts_the_original_image():
    """The box comes from the stored image and equals torchvision's draw from the same seed; the
    view equals torchvision's resized_crop of the original with that box."""
    arrays = images((31, 45, 3), n=4, seed=1)
    aug = Augment(flip=False)
    for i, a in enumerate(arrays):
        im = Image.fromarray(a)
        torch.manual_seed(i)
        want_box = tvt.RandomResizedCrop.get_params(im, scale=aug.scale, ratio=list(aug.ratio))
        assert aug.box(31, 45, torch.Generator().manual_seed(i)) == want_box
        top, left, h, w = want_box
        want = np.asarray(F.resized_crop(im, top, left, h, w, [20, 20],
                                         interpolation=F.InterpolationMode.BILINEAR))
        got = aug.apply(im, 20, torch.Generator().manual_seed(i))
        np.testing.assert_array_equal(got, want)
    # through the preprocess: same generator state -> the same normalised views
    pre, split = Preprocess(20, crop_pct=1.0), Split(arrays, np.zeros(4))
    x = pre(split, np.arange(4), Augment(), torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    by_hand = np.stack([Augment().apply(Image.fromarray(a), 20, g) for a in arrays])
    assert torch.equal(x, pre.normalise(by_hand))


def test_a_box_too_thin_for_the_ratio_falls_back_to_torchvision_central_crop():
    aug = Augment(scale=(2.0, 3.0))  # a box larger than the image never fits: the fallback
    assert aug.box(10, 40, torch.Generator()) == (0, 13, 10, 13)  # full height, width h·4/3
    im = Image.fromarray(images((10, 40, 3), n=1)[0])
    assert tvt.RandomResizedCrop.get_params(im, [2.0, 3.0], [3 / 4, 4 / 3]) == (0, 13, 10, 13)


def test_preprocess_config_overrides_are_checked_recorded_and_keyed(tmp_path):
    cfg = make_config(sets=["preprocess.mean=[0, 0, 0]", "preprocess.std=1",
                            "preprocess.interpolation=bicubic"])
    assert cfg.preprocess == {"mean": [0.0] * 3, "std": [1.0] * 3, "interpolation": "bicubic"}
    assert json.loads(json.dumps(cfg.to_dict()))["preprocess"] == cfg.preprocess  # resumable
    pre = Preprocess(32, interpolation="bilinear").with_overrides(cfg.preprocess)
    assert (pre.mean, pre.std, pre.interpolation) == ((0, 0, 0), (1, 1, 1), "bicubic")
    assert pre.key != Preprocess(32, interpolation="bilinear").key
    assert pre.describe()["resize_to"] == 36
    for bad, says in [("size=32", "image_size"), ("crop_pct=0", r"\(0, 1\]"),
                      ("interpolation=cubic", "bicubic"), ("mean=[1, 2]", "three numbers"),
                      ("std=[1, 0, 1]", "positive"), ("crop=1", "valid: mean")]:
        with pytest.raises(ConfigError, match=says):
            make_config(sets=[f"preprocess.{bad}"])


def test_the_run_records_the_effective_transform(tmp_path):
    from retain.runner import build, new_results

    flags = {"dataset": "digits", "backbone": "vit_tiny_random", "method": "simplecil",
             "out": str(tmp_path / "r"), "cache": False}
    r = build(make_config(flags=flags, sets=["preprocess.crop_pct=0.5"]))
    assert r.method.backbone.preprocess.crop_pct == 0.5  # what the method embeds with
    res = json.loads(json.dumps(new_results(r)))  # as results.json holds it
    assert res["preprocess"]["crop_pct"] == 0.5 and res["preprocess"]["resize_to"] == 64
    assert res["backbone"]["preprocess"] == res["preprocess"]


# -- learning-rate schedules and clipping -----------------------------------------------------
def _rates(unit: str, epochs=4, n=6, batch=2, lr=0.1) -> list[float]:
    from retain.context import Context
    from retain.training import fit

    model, seen = torch.nn.Linear(2, 2), []
    opt_seen = register_optimizer_step_pre_hook(
        lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    try:
        fit(model, lambda pos: torch.ones(len(pos), 2), torch.zeros(n, dtype=torch.long),
            Context(), epochs=epochs, lr=lr, batch_size=batch,
            generator=torch.Generator().manual_seed(0), schedule_unit=unit)
    finally:
        opt_seen.remove()
    return seen


def test_cosine_per_epoch_equals_the_closed_form():
    """Epoch e of E at lr·(1 + cos(πe/E))/2 for all its batches (CosineAnnealingLR(T_max=E)
    stepped per epoch); per step the cosine runs over all E·⌈N/B⌉ batches."""
    per_epoch = [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4) for _ in range(3)]
    assert _rates("epoch") == pytest.approx(per_epoch)
    assert _rates("step") == pytest.approx([0.1 * (1 + math.cos(math.pi * k / 12)) / 2
                                            for k in range(12)])
    assert _rates("epoch", epochs=1) == pytest.approx([0.1] * 3)  # 1 epoch: the full rate
    with pytest.raises(ValueError, match="schedule_unit"):
        _rates("batch")


def test_methods_step_as_their_official_code_and_offer_the_other():
    from retain.methods import METHODS

    for name in ("aper", "ranpac", "layup", "ease", "esn", "sprompts", "proof", "promptfusion"):
        cls = METHODS.get(name)
        assert validate(cls, {}) == {} and cls.__init__.__kwdefaults__["schedule_unit"] == "epoch"
        assert validate(cls, {"schedule_unit": "step"}) == {"schedule_unit": "step"}


def test_clip_grad_null_switches_clipping_off():
    from retain.context import Context
    from retain.methods import METHODS
    from retain.training import fit

    for name in ("l2p", "dualprompt", "coda_prompt", "dap", "hide_prompt", "promptfusion"):
        assert validate(METHODS.get(name), {"clip_grad": "null"}) == {"clip_grad": None}

    def step(clip):
        model = torch.nn.Linear(3, 1, bias=False)
        torch.nn.init.zeros_(model.weight)
        fit(model, lambda pos: torch.full((len(pos), 3), 100.0), torch.zeros(2), Context(),
            epochs=1, batch_size=2, generator=torch.Generator(), clip_grad=clip,
            loss_fn=lambda z, y: z.sum(), optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
        return model.weight.norm().item()

    assert step(None) == pytest.approx(200 * math.sqrt(3))  # the full gradient
    assert step(1.0) == pytest.approx(1.0)
