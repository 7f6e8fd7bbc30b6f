"""Integrity: verified reads of cache shards, checkpoints and results.json, the run lock,
strict JSON, the umask, and no code from weights files (issue #15)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from retain import io as rio
from retain.cli import main as cli
from retain.config import make_config
from retain.errors import IntegrityError, RunLockedError, WeightsError
from retain.features import INDEX, FeatureCache
from retain.runner import run


def strict_load(text: str):
    """JSON as JavaScript's JSON.parse reads it: NaN and Infinity are errors."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def quiet(*_):
    pass


def tiny_config(tmp_path: Path, name: str = "run", **sets):
    flags = {"dataset": "tiny_synthetic", "backbone": "vit_tiny_random", "image_size": 16,
             "method": "simplecil", "scenario": "B0Inc2", "out": str(tmp_path / name),
             "cache_dir": str(tmp_path / "c")}
    return make_config(flags=flags, sets=[f"{k}={v}" for k, v in sets.items()])


@pytest.fixture(autouse=True)
def _tiny_dataset(tiny_dataset):
    """Runs here read the tests' tiny synthetic bundle (dataset ``tiny_synthetic``)."""


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_dataset):
    """One finished 3-task run (every checkpoint kept) and its results."""
    tmp = tmp_path_factory.mktemp("clean")
    results = run(tiny_config(tmp, keep_checkpoints="all"), echo=quiet, progress=False)
    return tmp, results


def copy_run(clean_run, tmp_path: Path) -> Path:
    src, _ = clean_run
    shutil.copytree(src / "run", tmp_path / "run")
    shutil.copytree(src / "c", tmp_path / "c")
    return tmp_path / "run"


# ------------------------------------------------------------------------- io: JSON, umask

def test_every_json_retain_writes_is_strict_and_nan_becomes_null(clean_run):
    tmp, results = clean_run
    files = sorted(tmp.rglob("*.json"))
    assert {"results.json", "config.json", "task-000.json", INDEX} <= {p.name for p in files}
    for p in files:
        strict_load(p.read_text())
    on_disk = strict_load((tmp / "run" / "results.json").read_text())
    assert on_disk["accuracy_matrix"][0][1:] == [None, None]  # upper triangle
    assert on_disk["summary"]["old_accuracy"][0] is None
    assert rio.strict_json({"a": float("nan"), "b": np.float32(2.5), "c": np.arange(2),
                            "d": (float("inf"), Path("x"))}) == {"a": None, "b": 2.5,
                                                                 "c": [0, 1], "d": [None, "x"]}


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_respect_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        rio.write_json(tmp_path / "a.json", {"x": 1})
        rio.write_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
    finally:
        os.umask(old)
    for name in ("a.json", "t.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask


def test_open_regular_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(IntegrityError, match="a FIFO"):
        rio.read_tensors(fifo)
    with pytest.raises(IntegrityError, match="not valid JSON"):
        (tmp_path / "r.json").write_text('{"a": 1,')
        rio.read_json(tmp_path / "r.json")


# ------------------------------------------------------------------------- feature cache

def shards(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def corruptions():
    def zeros(b):
        return bytes(len(b))

    def truncate(b):
        return b[: len(b) // 2]

    def flip(b):
        return b[:-9] + bytes([b[-9] ^ 0xFF]) + b[-8:]

    def shuffle_rows(b):  # a valid file: same rows, features permuted
        from safetensors.torch import load, save

        t = load(b)
        return save({"index": t["index"], "features": t["features"].flip(0).contiguous()},
                    metadata={"entry": "x"})

    return [zeros, truncate, flip, shuffle_rows]


@pytest.mark.parametrize("corrupt", corruptions(), ids=lambda f: f.__name__)
def test_a_damaged_shard_is_discarded_and_recomputed_with_one_warning(
        tiny_vit, bundle, tmp_path, caplog, corrupt):
    clean = FeatureCache(tmp_path, shard_rows=16).features(tiny_vit, bundle.train)
    victim = shards(tmp_path)[1]
    victim.write_bytes(corrupt(victim.read_bytes()))
    cache = FeatureCache(tmp_path, shard_rows=16)
    with caplog.at_level(logging.WARNING, "retain.features"):
        again = cache.features(tiny_vit, bundle.train)
    torch.testing.assert_close(again, clean)
    assert 0 < cache.images_embedded <= 16  # only that shard's images
    assert len(caplog.records) == 1 and str(victim) in caplog.records[0].getMessage()
    assert FeatureCache(tmp_path).features(tiny_vit, bundle.train).equal(again)


@pytest.mark.parametrize("rows", [[[-1, 15]], [[0, 10**8]], [[5, 3]], "x"])
def test_index_rows_outside_the_split_are_rejected(tiny_vit, bundle, tmp_path, caplog, rows):
    clean = FeatureCache(tmp_path, shard_rows=16).features(tiny_vit, bundle.train)
    index = next(tmp_path.rglob(INDEX))
    doc = json.loads(index.read_text())
    first = sorted(doc["shards"])[0]
    doc["shards"][first]["rows"] = rows
    index.write_text(json.dumps(doc))
    cache = FeatureCache(tmp_path, shard_rows=16)
    with caplog.at_level(logging.WARNING, "retain.features"):
        torch.testing.assert_close(cache.features(tiny_vit, bundle.train), clean)
    assert cache.images_embedded == 16 and len(caplog.records) == 1


def test_a_kill_during_embedding_loses_at_most_one_shard(tiny_vit, bundle, tmp_path):
    class DiesOnTheFourthBatch(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 4:
                raise KeyboardInterrupt  # as a kill would stop it, mid-shard
            return self.inner(x)

    dying = dataclasses.replace(tiny_vit, model=DiesOnTheFourthBatch(tiny_vit.model))
    with pytest.raises(KeyboardInterrupt):
        FeatureCache(tmp_path, shard_rows=16).features(dying, bundle.train, batch_size=8)
    assert len(shards(tmp_path)) == 1  # batches 1-2 made a shard; batch 3 is the work lost
    rest = FeatureCache(tmp_path, shard_rows=16)
    rest.features(tiny_vit, bundle.train, batch_size=8)
    assert rest.images_embedded == len(bundle.train) - 16


def test_shards_the_index_does_not_list_are_discarded(tiny_vit, bundle, tmp_path, caplog):
    FeatureCache(tmp_path, shard_rows=16).features(tiny_vit, bundle.train)
    index = next(tmp_path.rglob(INDEX))
    index.unlink()  # as a cache written by an older retain
    cache = FeatureCache(tmp_path, shard_rows=16)
    with caplog.at_level(logging.WARNING, "retain.features"):
        cache.features(tiny_vit, bundle.train)
    assert cache.images_embedded == len(bundle.train)
    assert len(caplog.records) == 1 and "does not list" in caplog.records[0].getMessage()


FILLER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from conftest import tiny_bundle
    from retain.backbones import create_backbone
    from retain import features
    root, role = Path(sys.argv[1]), sys.argv[2]
    bb = create_backbone("vit_tiny_random", image_size=16)
    if role == "first":  # holds the entry's lock after its first shard until told to go on
        inner = features.embed_chunks
        def held(*a, **k):
            for rows, f in inner(*a, **k):
                yield rows, f
                (root / "first-shard-written").touch()
                while not (root / "go-on").exists():
                    time.sleep(0.05)
        features.embed_chunks = held
    c = features.FeatureCache(root, shard_rows=16)
    f = c.features(bb, tiny_bundle().train)
    print(c.images_embedded, float(f.double().sum()), flush=True)
""")


def wait_for(condition, seconds: float = 300) -> None:
    import time

    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_processes_sharing_a_cache_embed_each_image_once(tmp_path):
    cmd = [sys.executable, "-c", FILLER.format(tests=str(Path(__file__).parent)), str(tmp_path)]
    first = subprocess.Popen(cmd + ["first"], stdout=subprocess.PIPE, text=True)
    second = None
    try:
        wait_for(lambda: (tmp_path / "first-shard-written").exists())
        second = subprocess.Popen(cmd + ["second"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        waiting = second.stderr.readline()  # blocks until the second is waiting for the lock
        assert "waiting for it" in waiting and f"pid {first.pid}" in waiting
        (tmp_path / "go-on").touch()
        (n1, s1), (n2, s2) = (p.communicate(timeout=300)[0].split() for p in (first, second))
    finally:
        for p in (first, second):
            if p and p.poll() is None:
                p.kill()
    assert (int(n1), int(n2)) == (72, 0) and s1 == s2  # 6 classes x 12 images, embedded once


# ------------------------------------------------------------------------- runs

def test_an_altered_checkpoint_is_refused_naming_it_and_the_way_out(clean_run, tmp_path):
    d = copy_run(clean_run, tmp_path)
    ckpt = d / "checkpoints" / "task-002.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-4] ^= 1  # one bit of one weight
    ckpt.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as err:
        run(tiny_config(tmp_path, keep_checkpoints="all"), echo=quiet, progress=False)
    msg = str(err.value)
    assert str(ckpt) in msg and "--rollback" in msg and "--fresh" in msg
    assert cli(["show", str(d)]) == 2


def test_rollback_to_the_last_verified_stage_then_resume_gives_the_clean_matrix(
        clean_run, tmp_path, capsys):
    d = copy_run(clean_run, tmp_path)
    (d / "checkpoints" / "task-002.safetensors").write_bytes(b"junk")
    assert cli(["verify", str(d)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and "task-002.safetensors" in out and "--rollback" in out
    assert cli(["verify", str(d), "--rollback"]) == 0
    assert len(json.loads((d / "results.json").read_text())["stages"]) == 2
    res = run(tiny_config(tmp_path, keep_checkpoints="all"), echo=quiet, progress=False)
    assert rio.strict_json(res["accuracy_matrix"]) == rio.strict_json(
        clean_run[1]["accuracy_matrix"])
    assert cli(["verify", str(d)]) == 0 and "all checks passed" in capsys.readouterr().out


def test_keep_last_offers_only_fresh(clean_run, tmp_path):
    src = tmp_path / "src"
    res = run(tiny_config(src), echo=quiet, progress=False)
    ckpt = src / "run" / "checkpoints" / "task-002.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match="No earlier checkpoint verifies.*--fresh"):
        run(tiny_config(src), echo=quiet, progress=False)
    fresh = run(tiny_config(src), fresh=True, echo=quiet, progress=False)
    assert rio.strict_json(fresh["accuracy_matrix"]) == rio.strict_json(res["accuracy_matrix"])


@pytest.mark.parametrize("edit, field", [
    (lambda r: r["stages"][1]["correct"].__setitem__(0, 10**4), r"stages\[1\].correct\[0\]"),
    (lambda r: r["stages"][2]["total"].__setitem__(1, 1), r"stages\[2\].total\[1\]"),
    (lambda r: r["stages"][1].__setitem__("task", "1"), r"stages\[1\].task"),
    (lambda r: r.__setitem__("num_tasks", 2), "stages"),
    (lambda r: r["summary"].__setitem__("last_accuracy", 0.99), "summary"),
    (lambda r: r["stages"][0]["checkpoint"].__setitem__("sha256", "0" * 63), "sha256"),
])
def test_results_json_is_validated_naming_the_field(clean_run, tmp_path, edit, field):
    d = copy_run(clean_run, tmp_path)
    results = json.loads((d / "results.json").read_text())
    edit(results)
    (d / "results.json").write_text(json.dumps(results))
    with pytest.raises(IntegrityError, match=field):
        run(tiny_config(tmp_path, keep_checkpoints="all"), echo=quiet, progress=False)


def test_consistent_but_altered_counts_are_caught_by_the_checkpoint_copy(clean_run, tmp_path,
                                                                           capsys):
    d = copy_run(clean_run, tmp_path)
    results = json.loads((d / "results.json").read_text())
    st = results["stages"][2]
    st["correct"][0] -= 1  # still <= total; summary recomputed so it agrees
    from retain import metrics, report

    results["summary"] = metrics.summary(*report.counts(results))
    results["accuracy_matrix"] = metrics.accuracy_matrix(*report.counts(results)).tolist()
    (d / "results.json").write_text(json.dumps(rio.strict_json(results)))
    assert cli(["show", str(d)]) == 2
    assert "counts" in capsys.readouterr().err


def test_a_second_run_on_a_locked_folder_is_refused_at_once_naming_the_holder(tmp_path):
    cfg = tiny_config(tmp_path)
    with rio.file_lock(cfg.run_dir / ".lock", wait=False, what="test"):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            run(cfg, echo=quiet, progress=False)


def test_a_stale_lock_is_taken_over(tmp_path):
    cfg = tiny_config(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / ".lock").write_text(f"{dead.pid}\n")
    lines = []
    run(cfg, echo=lines.append, progress=False)
    assert any(f"left by pid {dead.pid}" in str(x) for x in lines)


def test_verify_reports_a_damaged_cache_entry_the_run_used(clean_run, tmp_path, capsys):
    d = copy_run(clean_run, tmp_path)
    results = json.loads((d / "results.json").read_text())
    results["feature_cache"]["dir"] = str(tmp_path / "c")  # the copy's cache
    (d / "results.json").write_text(json.dumps(results))
    assert cli(["verify", str(d)]) == 0
    assert "rows verified" in capsys.readouterr().out
    victim = shards(tmp_path / "c")[0]
    victim.write_bytes(b"\0" * victim.stat().st_size)
    assert cli(["verify", str(d)]) == 1
    out = capsys.readouterr().out
    assert str(victim) in out and "embeds its images again" in out


# ------------------------------------------------------------------------- weights files

class Payload:
    """Unpickling this runs code (creates a file)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_efficientnet_weights_are_loaded_weights_only(tmp_path):
    from retain.backbones import create_backbone

    evil, ran = tmp_path / "evil.pth", tmp_path / "ran"
    torch.save({"state_dict": Payload(ran)}, evil)
    with pytest.raises(WeightsError, match="objects other than tensors"):
        create_backbone("efficientnet_lite0", weights=evil)
    assert not ran.exists()
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="junk.pth"):
        create_backbone("efficientnet_lite0", weights=tmp_path / "junk.pth")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_weights_are_read_without_running_the_archive(tmp_path):
    from retain.backbones.files import read_state

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)
            self.register_buffer("scale", torch.tensor([2.0]))
            self.blocks = torch.nn.ModuleList([torch.nn.LayerNorm(2) for _ in range(2)])

        def forward(self, x):
            x = self.fc(x) * self.scale
            for b in self.blocks:
                x = b(x)
            return x

    path = tmp_path / "net.pt"
    torch.jit.script(Net()).save(str(path))
    ref = torch.jit.load(str(path)).state_dict()
    got = read_state(path, "net")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    from retain.backbones.files import npz_bytes

    path = tmp_path / "w.npz"
    np.savez(path, a=np.array([Payload(tmp_path / "ran")], dtype=object))
    with pytest.raises(WeightsError, match="plain arrays"):
        npz_bytes(path, "vit")
    assert not (tmp_path / "ran").exists()
