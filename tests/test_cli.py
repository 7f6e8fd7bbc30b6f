"""The command line: errors name the problem and the fix; the README's default command runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from retain.cli import main


def test_list(capsys):
    for what, expected in [("methods", "simplecil"), ("datasets", "mnist5k"),
                           ("backbones", "efficientnet_lite0")]:
        assert main(["list", what]) == 0
        assert expected in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["run", "--method", "nope"], "unknown method 'nope'; choose one of: "),
    (["run", "--set", "nokey=1"], "unknown config key 'nokey'"),
    (["run", "--set", "seed=x"], "config.seed = 'x' has type str; expected int"),
    (["run", "--method", "finetune", "--set", "params.lr=fast"], "finetune.lr"),
    (["run", "--method", "finetune", "--set", "params.bogus=1"], "valid: batch_size, epochs"),
    (["run", "--scenario", "B0"], "B{m}Inc{n}"),
    (["run", "--dataset", "cifar100"], "--data-root"),
    (["run", "--backbone", "resnet_nope"], "unknown backbone"),
    (["show", "/nonexistent"], "no results.json in /nonexistent"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys, tmp_path):
    argv = argv + (["--out", str(tmp_path / "o")] if argv[0] == "run" else [])
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_config_file_and_set_precedence(tmp_path):
    from retain.config import make_config

    f = tmp_path / "c.yaml"
    f.write_text("method: finetune\nseed: 3\nparams: {epochs: 4}\n")
    cfg = make_config(f, {"seed": 5}, ["params.lr=0.5"])
    assert (cfg.method, cfg.seed, cfg.params) == ("finetune", 5, {"epochs": 4, "lr": "0.5"})
    f.write_text("- not a mapping\n")
    with pytest.raises(Exception, match="mapping"):
        make_config(f)


@pytest.mark.slow
def test_readme_default_command_end_to_end(tmp_path):
    """`retain run` with no arguments: SimpleCIL, EfficientNet-Lite0, MNIST-5k, fully offline."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "retain.cli", "run", "--out", str(out),
                           "--cache-dir", str(tmp_path / "cache"), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "task 5/5" in proc.stdout and "average incremental accuracy" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["method"] == "simplecil" and res["config"]["dataset"] == "mnist5k"
    assert res["backbone"]["name"] == "efficientnet_lite0"
    # a real pretrained backbone on real digits: far above the 10% of chance
    assert res["summary"]["last_accuracy"] > 0.7
    # the frozen-feature floor: each train and test image embedded exactly once
    assert sum(s["images_embedded"] for s in res["stages"]) == 5000
    shown = subprocess.run([sys.executable, "-m", "retain.cli", "show", str(out)],
                           capture_output=True, text=True, check=True).stdout
    assert "last accuracy (A_B)" in shown


def test_every_shipped_preset_is_a_valid_config():
    from retain.config import list_presets, make_config
    from retain.methods import METHODS
    from retain.params import validate

    names = list_presets()
    assert names, "no presets shipped"
    for name in names:
        cfg = make_config(preset=name)
        validate(METHODS.get(cfg.method), cfg.params, what=name)
        assert cfg.description


def test_preset_then_set_overrides(tmp_path):
    from retain.config import make_config

    cfg = make_config(preset="simplecil_cifar100_b0inc10", sets=["scenario=B50Inc10"])
    assert (cfg.dataset, cfg.scenario) == ("cifar100", "B50Inc10")


def test_exponent_notation_is_a_float():
    from retain.methods import METHODS
    from retain.params import validate

    assert validate(METHODS.get("finetune"), {"lr": "1e-3"}) == {"lr": 0.001}
