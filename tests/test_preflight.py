"""Inputs checked before any work: every method on the default backbone and on a tiny ViT, the
light stream and backbone descriptions against what is built, weights formats, subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_bundle

from retain import catalog, preflight
from retain.backbones import SPECS, create_backbone
from retain.config import make_config
from retain.errors import ConfigError, WeightsError
from retain.methods import METHODS
from retain.scenarios import make_scenario
from retain.specs import stream_spec

BACKBONES = ("efficientnet_lite0", "vit_tiny_random")  # the default one, and a tiny ViT


class Loaded(Exception):
    """Raised where the runner would start loading data: the run passed every check."""


@pytest.fixture
def no_loading(monkeypatch):
    import retain.runner

    def loaded(*_, **__):
        raise Loaded

    monkeypatch.setattr(retain.runner, "create_dataset", loaded)
    monkeypatch.setattr(retain.runner, "create_backbone", loaded)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_method_runs_or_is_refused_before_loading(backbone, no_loading, tmp_path):
    """`retain run --method M --backbone B` with M's defaults, through the run's own checks:
    either it reaches the loading of the data, or it is refused first, in one line that names
    what to use instead; the command line's torch-free check says the same."""
    from retain.runner import run

    verdicts = {}
    for name in METHODS.names():
        config = make_config(flags={"method": name, "backbone": backbone,
                                    "out": str(tmp_path / name)})
        try:
            run(config, echo=lambda *_: None, progress=False)
        except Loaded:
            verdicts[name] = None
        except ConfigError as e:
            msg = str(e)
            assert "\n" not in msg and "; use " in msg and name in msg, msg
            verdicts[name] = msg
        fast = catalog.methods()[name]["with_defaults_on"][backbone]
        assert fast == verdicts[name], name
    runs = sorted(n for n, v in verdicts.items() if v is None)
    print(backbone, "runs:", runs)
    assert "simplecil" in runs and "finetune" in runs
    assert len(runs) < len(verdicts)  # the prompt, CLIP and raw-pixel methods are refused


def test_the_torch_free_check_refuses_the_defaults_that_the_code_refuses(tmp_path):
    """check_inputs (catalog, no torch) and check_setting (the method's code) agree."""
    for name in METHODS.names():
        for backbone in SPECS:
            config = make_config(flags={"method": name, "backbone": backbone,
                                        "out": str(tmp_path)})
            errors = []
            for check in (preflight.check_inputs, preflight.check_setting):
                try:
                    check(config)
                    errors.append(None)
                except ConfigError as e:
                    errors.append(str(e))
                except Exception as e:  # noqa: BLE001  (e.g. hub weights: not this test's case)
                    errors.append(type(e).__name__)
            assert errors[0] is None or errors[0] == errors[1], (name, backbone, errors)


@pytest.mark.parametrize("name", ["B0Inc2", "B2Inc3", "TIL-B0Inc2", "Permuted3", "Rotated2",
                                  "TaskFree5:B0Inc2", "TaskFree:Permuted2", "B4Inc1"])
def test_stream_spec_matches_the_built_scenario(name):
    bundle = tiny_bundle()
    built = make_scenario(bundle, name)
    spec = stream_spec(name, bundle.num_classes)
    assert (spec.kind, spec.num_tasks, spec.task_free) == (
        built.kind, len(built), name.startswith("TaskFree"))


def test_backbone_specs_match_the_built_backbones():
    for name in ("efficientnet_lite0", "vit_tiny_random", "clip_tiny_random", "pixels",
                 "pixels_rgb", "resnet18_reduced"):
        spec, b = SPECS[name], create_backbone(name)
        assert b.preprocess.size == spec.size, name
        vit = b.model
        assert len(getattr(vit, "blocks", ())) == spec.depth, name
        if spec.patch:
            assert vit.patch_embed.patch_size[0] == spec.patch, name
        small = create_backbone(name, image_size=spec.min_size)  # the smallest accepted input
        small.model(torch.zeros(1, b.preprocess.channels, spec.min_size, spec.min_size))


def test_weights_formats_are_sniffed(tmp_path):
    from safetensors.torch import save_file

    state = {"w": torch.zeros(3)}
    save_file(state, tmp_path / "a.safetensors")
    torch.save(state, tmp_path / "b.pth")
    torch.save(state, tmp_path / "c.bin", _use_new_zipfile_serialization=False)
    np.savez(tmp_path / "d.npz", w=np.zeros(3))
    got = [preflight.sniff_weights(tmp_path / f) for f in
           ("a.safetensors", "b.pth", "c.bin", "d.npz")]
    assert got == ["safetensors", "torch-zip", "torch-pickle", "npz"]
    (tmp_path / "e.pth").write_text("not weights")
    with pytest.raises(WeightsError, match="not a checkpoint"):
        preflight.sniff_weights(tmp_path / "e.pth")


def test_per_class_subset_is_seeded_and_keeps_positions():
    from retain.datasets import per_class_subset

    bundle = tiny_bundle(num_classes=4, train=10, test=5)
    a = per_class_subset(bundle, train=3, test=2, seed=7)
    b = per_class_subset(bundle, train=3, test=2, seed=7)
    c = per_class_subset(bundle, train=3, test=2, seed=8)
    assert np.array_equal(a.train.index, b.train.index)
    assert not np.array_equal(a.train.index, c.train.index)
    assert np.bincount(a.train.targets).tolist() == [3] * 4
    assert np.bincount(a.test.targets).tolist() == [2] * 4
    # positions in the full split: the same images, the same cache key
    assert np.array_equal(bundle.train.data[a.train.index], a.train.data)
    assert a.train.key == bundle.train.key
    assert a.source["subset"]["train_size"] == 12
    whole = per_class_subset(bundle, train=100, seed=7)  # more than a class has: all of it
    assert len(whole.train) == len(bundle.train) and len(whole.test) == len(bundle.test)


def test_subset_is_a_config_key_recorded_with_the_run():
    cfg = make_config(sets=["subset.train=30", "subset.test=5"])
    assert cfg.subset == {"train": 30, "test": 5} and cfg.to_dict()["subset"] == cfg.subset
    with pytest.raises(ConfigError, match="at least 1 image per class"):
        make_config(sets=["subset.train=0"])
