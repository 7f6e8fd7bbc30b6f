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


# -- every input error: one `error:` line, exit code 2, nothing loaded first -----------------

def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def bad_inputs(tmp):
    """(argv, text the one error line must hold) for inputs a new user gets wrong."""
    a_file = _write(tmp / "a_file", b"x")
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'
    return [
        (["run", "--device", "tpu"], "unknown device 'tpu'; use auto, cpu, cuda"),
        (["run", "--set", "seed=[1"], "config.seed = '[1' has type str; expected int"),
        (["run", "--set", "sead=1"], "unknown config key 'sead' in --set sead=1; did you mean "
                                     "'seed'?"),
        (["run", "--config", _write(tmp / "typo.yaml", b"sead: 1\n")],
         "unknown config key 'sead' in " + str(tmp / "typo.yaml") + "; did you mean 'seed'?"),
        (["run", "--config", _write(tmp / "bad.yaml", b"method: [simplecil\n")],
         "is not valid YAML"),
        (["run", "--config", _write(tmp / "bin.yaml", bytes(range(256)))], "is not a text file"),
        (["run", "--config", _write(tmp / "tag.yaml", b"seed: !!python/object:os.system {}\n")],
         "no tags"),
        (["run", "--config", str(tmp)], "is a folder, not a file"),
        (["run", "--set", "subset.trian=3"], "did you mean 'subset.train'"),
        (["run", "--method", "simplcil"], "unknown method 'simplcil'; did you mean 'simplecil'?"),
        (["run", "--method", "aper", "--set", "params.pft=ssf"], "did you mean 'peft'?"),
        (["run", "--method", "aper", "--set", "params.peft=adpter"], "did you mean 'adapter'?"),
        (["run", "--method", "aper"], "aper's peft=adapter needs a ViT (or CLIP) backbone, and "
                                      "efficientnet_lite0 is a CNN; use --set params.peft="),
        (["run", "--method", "aper", "--set", "params.epochs=1"], "aper's peft=adapter needs"),
        (["run", "--method", "apd", "--backbone", "pixels"], "--scenario TIL-B0Inc2"),
        (["run", "--method", "simplecil", "--backbone", "pixels_rgb"], "needs a pretrained "
                                                                       "feature extractor"),
        (["run", "--method", "ewc", "--scenario", "TaskFree:B0Inc2"], "task boundaries"),
        (["run", "--image-size", "8"], "--image-size 8 is below the smallest input "
                                       "efficientnet_lite0 accepts (32 px)"),
        (["run", "--weights", a_file], "is not a checkpoint retain reads"),
        (["run", "--weights", _write(tmp / "e.pth", b"")], "is empty"),
        (["run", "--weights", _write(tmp / "t.safetensors", len(header).to_bytes(8, "little")
                                     + header + b"\0" * 7)], "is truncated"),
        (["run", "--weights", _write(tmp / "z.pth", b"PK\x03\x04broken")], "damaged or truncated"),
        (["run", "--weights", str(tmp / "missing.pth")], "no such file"),
        (["run", "--out", a_file], "is a file, not a folder"),
        (["run", "--out", "/proc/retain-run"], "is not writable"),
        (["run", "--cache-dir", a_file], "--cache-dir (the feature cache)"),
        (["run", "--scenario", "B0Inc0x"], "unknown scenario 'B0Inc0x'"),
    ]


def test_every_input_error_is_one_line_before_anything_loads(tmp_path, capsys, monkeypatch):
    import retain.runner

    def loaded(*_, **__):
        raise AssertionError("data or weights were loaded before the input was checked")

    monkeypatch.setattr(retain.runner, "create_dataset", loaded)
    monkeypatch.setattr(retain.runner, "create_backbone", loaded)
    for argv, message in bad_inputs(tmp_path):
        out = [] if "--out" in argv else ["--out", str(tmp_path / "run")]
        assert main(argv + out) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert message in err, (argv, err)


def test_results_json_damaged_is_an_error_from_run_and_show(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for content, words in [(b"", "is empty"), (b'{"config": {', "not valid JSON"),
                           (b"[1, 2]", "not a results file"), (b'{"config": {}}', "field format")]:
        (run_dir / "results.json").write_bytes(content)
        for argv in (["show", str(run_dir)], ["run", "--out", str(run_dir)]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and words in err, (argv, err)


def test_debug_shows_the_traceback_of_an_input_error():
    from retain.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown device"):
        main(["run", "--device", "tpu", "--debug"])


def test_a_missing_device_names_the_devices_present():
    import torch

    from retain.context import resolve_device
    from retain.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    with pytest.raises(ConfigError, match=r"device 'cuda' is not present here; present: cpu"):
        resolve_device("cuda")


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--seed", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: argument")


def test_list_params_and_info(capsys):
    assert main(["list", "params", "aper"]) == 0
    out = capsys.readouterr().out
    assert "peft" in out and "one of: finetune" in out and "'adapter'" in out
    assert main(["info", "coda_prompt"]) == 0
    out = capsys.readouterr().out
    assert "Smith et al." in out and "coda_prompt_cifar100_b0inc10" in out
    assert "not on the default backbone: coda_prompt needs a ViT" in out
    assert main(["list", "presets"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("den_mnist5k")]
    assert rows and " offline " in rows[0]  # mnist5k and raw pixels: both on any machine
