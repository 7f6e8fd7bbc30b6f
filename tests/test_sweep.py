"""Sweeps: grids refused before anything starts, runs through a local Ray, a killed driver
resumed by the same command, failures recorded, the report against a hand computation, and the
published-number table with its provenance."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from retain.cli import main
from retain.errors import ConfigError
from retain.sweep import published as pub
from retain.sweep.grid import check_scenario, expand, read_sweep_file, spec_from_flags

SWEEP = """\
description: digits test sweep
datasets: [digits]
scenarios: [B0Inc2]
backbones: [vit_tiny_random]
seeds: [1993, 1994]
methods:
  - simplecil
  - {method: finetune, params: {epochs: 3, lr: 0.05}}
  - {name: too-deep, method: layup, params: {peft: none, layers: 6}, seeds: [1993]}
"""
RUNS = ["simplecil-digits-B0Inc2-vit_tiny_random-s1993",
        "simplecil-digits-B0Inc2-vit_tiny_random-s1994",
        "finetune-digits-B0Inc2-vit_tiny_random-s1993",
        "finetune-digits-B0Inc2-vit_tiny_random-s1994"]
FAILING = "too-deep-digits-B0Inc2-vit_tiny_random-s1993"


def sweep_cmd(file: Path, out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "retain.cli", "sweep", str(file), "--out", str(out),
            "--cache-dir", str(cache), "--num-cpus", "2", "--max-concurrent", "2", "--quiet"]


def strict_json(path: Path):
    def refuse(token):
        raise ValueError(f"{path} holds {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted sweep: 2 methods x 2 seeds and a point that fails, on local Ray."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "digits.yaml").write_text(SWEEP)
    out = subprocess.run(sweep_cmd(root / "digits.yaml", root / "ref", root / "cache"),
                         capture_output=True, text=True, timeout=600)
    return root, out


# ------------------------------------------------------------------------------ Ray sweeps


def test_sweep_runs_every_point_on_ray_and_records_the_failing_one(reference):
    root, out = reference
    assert out.returncode == 2, out.stderr[-2000:]  # some runs failed: exit 2, others done
    assert "1 of 5 runs failed" in out.stderr
    lines = out.stdout.splitlines()
    assert sum(line.startswith("done ") for line in lines) == 4
    assert any(line.startswith("FAILED too-deep") and "at least 6 blocks" in line
               for line in lines)
    for name in RUNS:
        res = json.loads((root / "ref" / "runs" / name / "results.json").read_text())
        assert len(res["stages"]) == 5 and res["environment"]["timm"]
        assert res["environment"]["dataset_key"]["train"]
        assert sum(s["images_embedded"] for s in res["stages"]) == 0  # all from the warm-up
    err = strict_json(root / "ref" / "runs" / FAILING / "error.json")
    assert err["error"] == "ConfigError" and "Traceback" in err["traceback"]  # refused up front
    warm = strict_json(root / "ref" / "warmup.json")
    assert [(w["images_embedded"], w["images"], w["runs"]) for w in warm] == [(1797, 1797, 5)]
    plan = strict_json(root / "ref" / "sweep.json")
    assert [p["name"] for p in plan["points"]] == [*RUNS, FAILING]


def test_killed_driver_then_the_same_command_gives_the_uninterrupted_results(reference):
    root, _ = reference
    victim = root / "victim"
    cmd = sweep_cmd(root / "digits.yaml", victim, root / "cache-victim")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        stages = wait_for_progress(victim / "runs", proc)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only; its Ray goes down with it
        proc.wait()
        assert sum(n == 5 for n in stages.values()) < 4, "the sweep ended before the kill"
        stages = settled(victim / "runs")  # a left-over worker may finish its task first
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # Ray helpers of the killed driver, if any
    assert out.returncode == 2, out.stderr[-2000:]
    finished = sum(n == 5 for n in stages.values())
    assert f"{finished} finished, {5 - finished} to run" in out.stdout
    for name, n in stages.items():
        if 0 < n < 5:
            assert f"{n} of 5 tasks already learned" in (victim / "runs" / name /
                                                         "sweep.log").read_text()
    for name in RUNS:
        ref = json.loads((root / "ref" / "runs" / name / "results.json").read_text())
        got = json.loads((victim / "runs" / name / "results.json").read_text())
        assert got["class_order"] == ref["class_order"]
        np.testing.assert_array_equal(got["accuracy_matrix"], ref["accuracy_matrix"])
        keys = ("task", "correct", "total", "num_classes", "new_classes", "parameters")
        assert [{k: s[k] for k in keys} for s in got["stages"]] == \
            [{k: s[k] for k in keys} for s in ref["stages"]]
    assert (victim / "runs" / FAILING / "error.json").is_file()


def stage_counts(runs: Path) -> dict[str, int]:
    stages = {}
    for res in runs.glob("*/results.json"):
        try:
            stages[res.parent.name] = len(json.loads(res.read_text())["stages"])
        except (OSError, ValueError):
            continue
    return stages


def wait_for_progress(runs: Path, proc, timeout: float = 300) -> dict[str, int]:
    """Poll until one run is finished and another has begun (or the driver exits)."""
    deadline = time.time() + timeout
    stages: dict[str, int] = {}
    while time.time() < deadline and proc.poll() is None:
        stages = stage_counts(runs)
        if any(n == 5 for n in stages.values()) and any(0 < n < 5 for n in stages.values()):
            break
        time.sleep(0.05)
    return stages


def settled(runs: Path, timeout: float = 180) -> dict[str, int]:
    """The stages on disk once no worker of the killed driver holds a run folder's lock (Ray
    ends a dead driver's workers after a delay; one may still finish its current task)."""
    import fcntl

    from retain.sweep.tasks import LOCK_FILE

    deadline = time.time() + timeout
    for lock in runs.glob(f"*/{LOCK_FILE}"):
        with open(lock, "a") as f:
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(f, fcntl.LOCK_UN)
                    break
                except BlockingIOError:
                    assert time.time() < deadline, f"{lock} still held"
                    time.sleep(0.1)
    return stage_counts(runs)


# --------------------------------------------------------------------------------- report


def test_report_means_and_stds_equal_a_hand_computation(reference):
    root, _ = reference
    rows = {r["label"]: r for r in csv.DictReader((root / "ref" / "results.csv").open())}
    for method in ("simplecil", "finetune"):
        files = sorted((root / "ref" / "runs").glob(f"{method}-*/results.json"))
        assert len(files) == 2
        for key in ("last_accuracy", "avg_incremental_accuracy", "forgetting"):
            x = np.array([json.loads(f.read_text())["summary"][key] for f in files]) * 100
            assert float(rows[method][f"{key}_mean_pct"]) == pytest.approx(x.mean(), abs=1e-4)
            assert float(rows[method][f"{key}_std_pct"]) == pytest.approx(
                np.sqrt(((x - x.mean()) ** 2).sum() / (len(x) - 1)), abs=1e-4)  # ddof = 1
        assert rows[method]["n"] == "2" and rows[method]["seeds"] == "1993 1994"
    assert rows["too-deep"]["n"] == "0" and rows["too-deep"]["failed"] == "1"
    md = (root / "ref" / "report.md").read_text()
    html = (root / "ref" / "report.html").read_text()
    assert "sample standard deviation" in md and FAILING in md and "ConfigError" in md
    assert html.count("data:image/png;base64,") == 2 and "report_files/" not in html
    for text in (md, html, (root / "ref" / "results.csv").read_text()):
        assert "NaN" not in text and "nan" not in text.split()


def test_report_reads_results_with_nan_or_null(reference, tmp_path):
    root, _ = reference
    src = root / "ref" / "runs" / RUNS[0]
    for form in ("NaN", "null"):
        d = tmp_path / form / "run"
        d.mkdir(parents=True)
        text = (src / "results.json").read_text()
        assert "NaN" in text or "null" in text
        (d / "results.json").write_text(text.replace("NaN", form).replace("null", form))
        assert main(["report", str(tmp_path / form)]) == 0
        row = next(csv.DictReader((tmp_path / form / "results.csv").open()))
        want = json.loads(text)["summary"]["last_accuracy"] * 100
        assert float(row["last_accuracy_mean_pct"]) == pytest.approx(want, abs=1e-4)


def test_report_puts_the_published_number_beside_a_matching_setting(reference, tmp_path):
    root, _ = reference
    res = json.loads((root / "ref" / "runs" / RUNS[0] / "results.json").read_text())
    res["config"] |= {"dataset": "cifar100", "scenario": "B0Inc5"}  # as if run on CIFAR
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(res))
    assert main(["report", str(tmp_path)]) == 0
    row = next(csv.DictReader((tmp_path / "results.csv").open()))
    assert float(row["published_last_accuracy_pct"]) == 81.26  # EASE Table 1, SimpleCIL
    assert float(row["published_avg_incremental_accuracy_pct"]) == 87.57
    ours = res["summary"]["last_accuracy"] * 100
    assert float(row["difference_last_accuracy_pct"]) == pytest.approx(ours - 81.26, abs=1e-4)
    assert row["protocol_flags"] == "other backbone (published: " \
        "vit_base_patch16_224.augreg_in21k)"
    md = (tmp_path / "report.md").read_text()
    assert "81.26 [1]" in md and "⚠ other backbone" in md and "1. Zhou et al., Expandable" in md


# ----------------------------------------------------------------------------------- grid


def grid(tmp_path, text: str, sets=()):
    (tmp_path / "s.yaml").write_text(text)
    return expand(read_sweep_file(tmp_path / "s.yaml"), tmp_path / "out", list(sets))


@pytest.mark.parametrize("text, message", [
    ("methods: [simplecil]\nseed: 3\n", r"unknown key\(s\) \['seed'\]"),
    ("methods: [simplecil, {method: ranpac, parms: {}}]\n",
     r"entry 2 \(ranpac\): unknown key\(s\) \['parms'\]"),
    ("methods: [simplecl]\n", r"entry 1 \(simplecl\).*unknown method 'simplecl'"),
    ("datasets: [mnist5k, cifar10]\nmethods: [simplecil]\n",
     r"entry 1 \(simplecil\).*unknown dataset 'cifar10'"),
    ("methods: [{method: ranpac, params: {lamda: 1}}]\n",
     r"entry 1 \(ranpac\).*unknown hyper-parameter 'lamda'"),
    ("methods: [{method: ranpac, params: {epochs: -1}}]\n", r"entry 1 \(ranpac\).*epochs"),
    ("scenarios: [B0Inc2, Inc5]\nmethods: [simplecil]\n", r"entry 1.*unknown scenario 'Inc5'"),
    ("backbones: [vit_huge_nowhere]\nmethods: [simplecil]\n", r"unknown backbone"),
    ("methods: [simplecil, {method: simplecil}]\n", r"entries 1 and 2 both give the run"),
    ("methods: [{method: simplecil, preset: simplecil_cifar100_b0inc10}]\n", r"exactly one of"),
])
def test_a_bad_sweep_file_is_refused_naming_the_entry(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        grid(tmp_path, text)


def test_precedence_preset_config_entry_axes_set(tmp_path):
    points = grid(tmp_path, "seeds: [1, 2]\nconfig: {image_size: 64, batch_size: 4}\n"
                  "grid: {params.alpha: [0.1, 0.2]}\n"
                  "methods: [{preset: ease_cifar100_b0inc10, image_size: 96}]\n",
                  ["batch_size=8"])
    assert len(points) == 4
    c = points[0].config
    assert (c.method, c.dataset, c.scenario, c.backbone) == (
        "ease", "cifar100", "B0Inc10", "vit_base_patch16_224.augreg_in21k")  # preset
    assert c.image_size == 96 and c.batch_size == 8  # entry over config, --set over all
    assert c.params["epochs"] == 20 and c.params["lr"] == 0.025  # the preset's, kept
    assert sorted((p.config.seed, p.config.params["alpha"]) for p in points) == [
        (1, 0.1), (1, 0.2), (2, 0.1), (2, 0.2)]  # axes over the preset's seed and params
    assert points[0].name == "ease_cifar100_b0inc10-cifar100-B0Inc10-vit_base_patch16_224." \
        "augreg_in21k-alpha=0.1-s1"
    assert Path(c.out) == tmp_path / "out" / "runs" / points[0].name
    with pytest.raises(ConfigError, match="chooses each run's folder"):
        grid(tmp_path, "methods: [simplecil]\n", ["out=x"])


def test_flags_make_the_same_grid(tmp_path):
    spec = spec_from_flags("simplecil,ranpac", "mnist5k,digits", None, "1993,1994")
    points = expand(spec, tmp_path, [])
    assert len(points) == 8 and {p.config.dataset for p in points} == {"mnist5k", "digits"}
    with pytest.raises(ConfigError, match="--seeds expects integers"):
        spec_from_flags("simplecil", seeds="a,b")


def test_shipped_sweeps_expand_and_validate(tmp_path):
    from retain.sweep.cli import SWEEPS, shipped

    assert {"offline_mini", "ptm_cifar100_b0inc10", "ptm_imagenet_r_b0inc20"} <= set(shipped())
    for name in shipped():
        points = expand(read_sweep_file(SWEEPS / f"{name}.yaml"), tmp_path, [])
        assert points and len({p.config.seed for p in points}) == 3, name


def test_offline_reproduction_fails_at_once_before_ray(tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(["reproduce", "ptm_cifar100_b0inc10", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "cifar100 is read from disk: pass `--data-root DIR`" in err
    assert "nothing was started" in err and time.perf_counter() - t0 < 60
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert main(["reproduce", "--list"]) == 0
    assert "offline_mini" in capsys.readouterr().out


# ------------------------------------------------------------------------- published table


def test_published_table_loads_and_every_entry_names_its_source():
    from retain import params as P
    from retain.datasets import DATASETS
    from retain.methods import METHODS

    entries = pub.load_published()
    assert len(entries) > 200
    for e in entries:
        for key in ("paper", "source", "table", "spec", "checkpoint", "metric_name"):
            assert isinstance(e[key], str) and len(e[key]) > 5, (key, e)
        assert "§" in e["spec"] and 0 < e["value"] <= 1
        assert e["metric"] in pub.METRICS and e["dataset"] in DATASETS
        P.validate(METHODS.get(e["method"]), e["params"], what=e["method"])
        check_scenario(e["scenario"])
    best = pub.lookup("aper", {"peft": "adapter"}, "cifar100", "B0Inc5", "last_accuracy",
                      "vit_base_patch16_224.augreg_in21k")
    assert (best[0]["table_id"], best[0]["value"]) == ("ease-table1", 0.8515)
    ranpac = pub.lookup("ranpac", {"peft": "none", "projection_dim": 10000}, "cifar100",
                        "B0Inc10", "last_accuracy")
    assert ranpac[0]["as_published"] == "RanPAC no Phase 1"  # the most specific variant


def test_protocol_differences_are_flagged():
    e = pub.lookup("l2p", {}, "cifar100", "B0Inc10", "last_accuracy")
    ports = next(x for x in e if x["table_id"] == "prompt-ports")
    flags = pub.protocol_flags(ports, backbone="efficientnet_lite0", uses_batch_information=False,
                               memory=0)
    assert flags == ["other backbone (published: vit_base_patch16_224.orig_in21k)",
                     "published run voted per batch"]
    icarl = pub.lookup("icarl", {}, "cifar100", "B0Inc10", "last_accuracy")[0]
    assert "other memory (500 here, 2000 published)" in pub.protocol_flags(
        icarl, backbone=icarl["backbone"], uses_batch_information=False, memory=500)
    assert pub.protocol_flags(icarl, backbone=icarl["backbone"], uses_batch_information=True,
                              memory=2000)[-1] == "batch vote used here"
