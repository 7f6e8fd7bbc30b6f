"""The runner: results and checkpoints on disk, exact resume after a crash or a kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from retain.config import make_config
from retain.errors import ConfigError
from retain.runner import run


def digits_config(tmp_path, name="run", **sets):
    flags = {"dataset": "digits", "backbone": "vit_tiny_random", "method": "finetune",
             "scenario": "B0Inc2", "out": str(tmp_path / name), "cache_dir": str(tmp_path / "c")}
    return make_config(flags=flags, sets=[f"{k}={v}" for k, v in sets.items()] +
                       ["params.epochs=2", "params.lr=0.05"])


def quiet(*_):
    pass


def test_run_writes_results_checkpoint_and_figures(tmp_path):
    cfg = digits_config(tmp_path)
    res = run(cfg, echo=quiet, progress=False)
    d = tmp_path / "run"
    assert {"results.json", "config.json", "accuracy_curve.png", "accuracy_matrix.png"} <= {
        p.name for p in d.iterdir()}
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == [
        "task-004.json", "task-004.safetensors"]
    on_disk = json.loads((d / "results.json").read_text())
    assert on_disk["class_order"] == np.random.RandomState(1993).permutation(10).tolist()
    assert on_disk["backbone"]["sha256"] and on_disk["config"]["seed"] == 1993
    assert len(on_disk["stages"]) == 5 == len(res["accuracy_matrix"])
    assert on_disk["summary"]["last_accuracy"] == res["summary"]["last_accuracy"]
    assert (d / "accuracy_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_after_a_crash_gives_the_same_matrix(tmp_path, monkeypatch):
    reference = run(digits_config(tmp_path, "ref"), echo=quiet, progress=False)
    cfg = digits_config(tmp_path, "crash")
    from retain.methods.finetune import Finetune

    original = Finetune._learn

    def crash_at_3(self, task, ctx):
        if task.id == 3:
            raise RuntimeError("simulated crash")
        original(self, task, ctx)

    monkeypatch.setattr(Finetune, "_learn", crash_at_3)
    with pytest.raises(RuntimeError):
        run(cfg, echo=quiet, progress=False)
    partial = json.loads((tmp_path / "crash" / "results.json").read_text())
    assert len(partial["stages"]) == 3
    monkeypatch.setattr(Finetune, "_learn", original)
    lines = []
    resumed = run(cfg, echo=lines.append, progress=False)
    assert any("resuming" in str(x) for x in lines)
    assert resumed["stages"][3]["correct"] == reference["stages"][3]["correct"]
    np.testing.assert_array_equal(resumed["accuracy_matrix"], reference["accuracy_matrix"])


def test_another_config_in_the_same_folder_is_an_error(tmp_path):
    run(digits_config(tmp_path), echo=quiet, progress=False)
    with pytest.raises(ConfigError, match="differs in \\['seed'\\]"):
        run(digits_config(tmp_path, seed=7), echo=quiet, progress=False)
    run(digits_config(tmp_path, seed=7), fresh=True, echo=quiet, progress=False)


@pytest.mark.slow
def test_kill_9_then_same_command_resumes_to_the_identical_matrix(tmp_path):
    args = ["--dataset", "digits", "--backbone", "vit_tiny_random", "--method", "finetune",
            "--scenario", "B0Inc2", "--cache-dir", str(tmp_path / "c"), "--quiet",
            "--set", "params.epochs=6"]
    cmd = [sys.executable, "-m", "retain.cli", "run", *args]
    subprocess.run(cmd + ["--out", str(tmp_path / "ref")], check=True, capture_output=True)
    victim = tmp_path / "victim"
    proc = subprocess.Popen(cmd + ["--out", str(victim)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for two finished tasks, then kill -9
        res = victim / "results.json"
        if res.is_file() and len(json.loads(res.read_text())["stages"]) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(json.loads((victim / "results.json").read_text())["stages"])
    assert done < 5, "the run finished before it could be killed"
    out = subprocess.run(cmd + ["--out", str(victim)], check=True, capture_output=True, text=True)
    assert f"resuming {victim}: {done} of 5" in out.stdout
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    got = json.loads((victim / "results.json").read_text())
    assert got["accuracy_matrix"] == ref["accuracy_matrix"]
    assert [s["correct"] for s in got["stages"]] == [s["correct"] for s in ref["stages"]]


def test_task_id_methods_get_ids_on_domain_streams_and_batch_use_is_labelled(tmp_path):
    flags = {"dataset": "digits", "backbone": "pixels", "scenario": "Permuted2",
             "cache": False}
    gg = run(make_config(flags=flags | {"method": "supsup", "out": str(tmp_path / "gg")},
                         sets=["params.epochs=1", "params.batch_size=32"]),
             echo=quiet, progress=False)
    assert gg["tags"] == ["needs_task_id_at_test"] and not gg["uses_batch_information"]
    assert gg["summary"]["last_accuracy"] > 0.5
    gn = run(make_config(flags=flags | {"method": "supsup_gn", "out": str(tmp_path / "gn")},
                         sets=["params.epochs=1", "params.batch_size=32",
                               "params.per_batch=true"]),
             echo=quiet, progress=False)
    assert gn["uses_batch_information"] and "task_inference_accuracy" in gn["stages"][-1]


def free_config(tmp_path, name="free", method="finetune", **sets):
    flags = {"dataset": "digits", "backbone": "vit_tiny_random", "method": method,
             "scenario": "TaskFree100:B0Inc2", "out": str(tmp_path / name),
             "cache_dir": str(tmp_path / "c")}
    return make_config(flags=flags, sets=[f"{k}={v}" for k, v in sets.items()] +
                       ["params.epochs=2", "params.lr=0.05"])


def test_task_free_run_learns_segments_and_resumes_at_a_task_end(tmp_path, monkeypatch):
    reference = run(free_config(tmp_path, "ref"), echo=quiet, progress=False)
    assert reference["task_free_segment"] == 100 and len(reference["accuracy_matrix"]) == 5
    assert all(s["segments"] >= 2 for s in reference["stages"])  # ~280 images per task
    assert reference["summary"]["last_accuracy"] > 0.1
    from retain.methods.finetune import Finetune

    original, calls = Finetune._learn, []

    def crash_in_task_3(self, task, ctx):
        assert task.free
        calls.append(task.id)
        if len(calls) == sum(s["segments"] for s in reference["stages"][:3]) + 1:
            raise RuntimeError("simulated crash in the first segment of task 3")
        original(self, task, ctx)

    monkeypatch.setattr(Finetune, "_learn", crash_in_task_3)
    with pytest.raises(RuntimeError):
        run(free_config(tmp_path, "crash"), echo=quiet, progress=False)
    partial = json.loads((tmp_path / "crash" / "results.json").read_text())
    assert len(partial["stages"]) == 3
    monkeypatch.setattr(Finetune, "_learn", original)
    resumed = run(free_config(tmp_path, "crash"), echo=quiet, progress=False)
    np.testing.assert_array_equal(resumed["accuracy_matrix"], reference["accuracy_matrix"])


def test_task_free_stream_refuses_methods_that_need_boundaries(tmp_path):
    with pytest.raises(ConfigError, match="lwf needs task boundaries.*finetune.*supsup_gn"):
        run(free_config(tmp_path, method="lwf"), echo=quiet, progress=False)


def test_nns_on_a_task_free_stream_reports_task_inference_per_true_task(tmp_path):
    flags = {"dataset": "mnist5k", "backbone": "pixels", "scenario": "TaskFree500:Permuted3",
             "method": "supsup_gn", "out": str(tmp_path / "nns"), "cache": False, "seed": 0}
    res = run(make_config(flags=flags, sets=["params.mode=NNs", "params.nns_every=32"]),
              echo=quiet, progress=False)
    assert [s["segments"] for s in res["stages"]] == [8, 8, 8]
    assert min(res["stages"][-1]["task_inference_accuracy"]) > 0.95
    assert res["summary"]["last_accuracy"] > 0.7
