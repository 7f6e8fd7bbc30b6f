"""Fuzzing (hypothesis): malformed configs, scenario strings, --set values, YAML bytes, damaged
cache shards, checkpoints and results, and hostile data folders each end in a clean
``RetainError`` or in exactly the clean run's result: never another exception, never a hang.

CI runs a small, derandomised profile (well under a minute); ``benchmarks/fuzz_long.py`` runs
the same properties with ``--hypothesis-profile=fuzz-long`` (10x the examples, random seeds).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import zlib
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from retain.config import RunConfig, make_config  # noqa: E402
from retain.datasets import create_dataset  # noqa: E402
from retain.errors import RetainError  # noqa: E402
from retain.features import FeatureCache  # noqa: E402
from retain.io import strict_json  # noqa: E402
from retain.methods import METHODS  # noqa: E402
from retain.params import validate  # noqa: E402
from retain.runner import run  # noqa: E402
from retain.scenarios import make_scenario  # noqa: E402
from retain.verify import trusted_results  # noqa: E402

SCALE = max(1, settings.default.max_examples // 100)  # 1 in CI; 10 with the fuzz-long profile


def fuzz(examples: int):
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=SCALE == 1,
                    database=None, suppress_health_check=list(HealthCheck))


class Hang(BaseException):  # not an Exception: no handler in retain may swallow it
    pass


@contextlib.contextmanager
def no_hang(seconds: int = 30):
    def alarm(*_):
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def outcome(fn):
    """fn()'s value, or the RetainError it raised; any other exception fails the test. The
    outcome is counted (``--hypothesis-show-statistics``)."""
    with no_hang():
        try:
            got = fn()
        except RetainError as e:
            assert str(e).strip()
            event(f"outcome: {type(e).__name__}")
            return e
    event("outcome: accepted")
    return got


# ------------------------------------------------------------------------- configs, YAML, --set

KEYS = [f.name for f in fields(RunConfig)] + ["bogus", "Method", ""]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=16))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                   st.dictionaries(st.text(max_size=6), SCALARS, max_size=3))
YAML_TOKENS = ["method:", " simplecil", " l2p", "\n", "seed: ", "1e99", "-3", "[", "]", "{", "}",
               "&a ", "*a", "!!python/object/apply:os.system ['true']", "- ", ":", "params:",
               "\n  lr: ", "\n  epochs: ", "'", '"', "\t", "%YAML 1.1\n", "---\n", "...", "~",
               "null", "\x00", "é", "<<: *a", "? ", "!!binary", "scenario: B0Inc"]


def write(tmp: str, name: str, data: bytes) -> Path:
    p = Path(tmp) / name
    p.write_bytes(data)
    return p


@fuzz(40)
@given(st.dictionaries(st.sampled_from(KEYS + ["params"]), VALUES, max_size=6))
def test_malformed_config_mappings(cfg):
    with tempfile.TemporaryDirectory() as tmp:
        path = write(tmp, "c.yaml", yaml.safe_dump(cfg).encode())
        got = outcome(lambda: make_config(path))
        if isinstance(got, RunConfig):
            outcome(lambda: validate(METHODS.get(got.method), got.params, what=got.method))


@fuzz(40)
@given(st.one_of(st.binary(max_size=300),
                 st.lists(st.sampled_from(YAML_TOKENS), max_size=30).map(
                     lambda t: "".join(t).encode("utf-8", "surrogatepass"))))
def test_yaml_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        outcome(lambda: make_config(write(tmp, "c.yaml", data)))


SET_KEYS = KEYS + ["params.lr", "params.epochs", "params.prompt_length", "params.nope", "params.",
                   "params.lr.x", " seed ", "seed"]


@fuzz(40)
@given(st.sampled_from(["simplecil", "l2p", "ewc", "ranpac", "finetune", "nope"]),
       st.lists(st.one_of(st.builds("{}={}".format, st.sampled_from(SET_KEYS),
                                    st.one_of(st.text(max_size=12), st.integers().map(str),
                                              st.floats().map(str))),
                          st.text(max_size=12)), max_size=5))
def test_set_values(method, sets):
    got = outcome(lambda: make_config(flags={"method": method}, sets=sets))
    if isinstance(got, RunConfig):
        outcome(lambda: validate(METHODS.get(got.method), got.params, what=got.method))


SCENARIOS = st.one_of(
    st.from_regex(r"\A(TaskFree[0-9]{0,4}:)?(TIL-)?(B[0-9]{0,3}Inc[0-9]{0,3}|Permuted[0-9]{0,2}|"
                  r"Rotated[0-9]{0,2}|Superclass-(CIL|TIL)|Domains|B-?[0-9]Inc-?[0-9])\Z"),
    st.text(max_size=20))


@fuzz(60)
@given(SCENARIOS, st.integers(0, 2**32 - 1))
def test_scenario_strings(bundle, text, seed):
    def build():
        scenario = make_scenario(bundle, text, seed=seed)
        return [len(t.train) for t in scenario]

    sizes = outcome(build)
    if isinstance(sizes, list):
        assert sum(sizes) >= len(bundle.train) and all(n > 0 for n in sizes)


# ------------------------------------------------------------------------- damaged files

MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "truncate", "insert", "zero", "junk",
                                                "json"]),
                               st.integers(0, 2**20), st.integers(0, 255)), min_size=1,
                     max_size=3)
JSON_VALUES = st.one_of(SCALARS, st.lists(st.integers(-5, 10**9), max_size=3),
                        st.lists(st.lists(st.integers(-2, 10**8), max_size=2), max_size=2))


def mutate(data: bytes, ops, draw) -> bytes:
    for kind, pos, byte in ops:
        at = pos % (len(data) + 1)
        if kind == "flip" and data:
            at %= len(data)
            data = data[:at] + bytes([data[at] ^ (byte or 1)]) + data[at + 1:]
        elif kind == "truncate":
            data = data[:at]
        elif kind == "insert":
            data = data[:at] + bytes([byte]) * (1 + pos % 7) + data[at:]
        elif kind == "zero":
            data = bytes(len(data))
        elif kind == "junk":
            data = os.urandom(byte)
        elif kind == "json":
            data = edit_json(data, draw)
    return data


def edit_json(data: bytes, draw) -> bytes:
    """Replace one value anywhere in a JSON document by a drawn one (a plausible tamper)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return data
    paths, stack = [], [((), doc)]
    while stack:
        path, node = stack.pop()
        paths.append(path)
        items = node.items() if isinstance(node, dict) else enumerate(node) \
            if isinstance(node, list) else []
        stack += [((*path, k), v) for k, v in items]
    path = draw(st.sampled_from(paths[1:] or [()]))
    if not path:
        return json.dumps(draw(JSON_VALUES)).encode()
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = draw(JSON_VALUES)
    return json.dumps(doc).encode()


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory, tiny_vit, bundle):
    root = tmp_path_factory.mktemp("cache")
    return root, FeatureCache(root, shard_rows=16).features(tiny_vit, bundle.train)


@fuzz(30)
@given(st.data(), MUTATIONS)
def test_damaged_cache_files_are_recomputed_to_the_same_features(clean_cache, tiny_vit, bundle,
                                                                 data, ops):
    root, clean = clean_cache
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "c"
        shutil.copytree(root, copy)
        files = sorted(p for p in copy.rglob("*") if p.is_file() and p.name != ".lock")
        victim = data.draw(st.sampled_from(files))
        victim.write_bytes(mutate(victim.read_bytes(), ops, data.draw))
        cache = FeatureCache(copy, shard_rows=16)
        with no_hang():  # no RetainError either: a bad shard is recomputed, never fatal
            again = cache.features(tiny_vit, bundle.train)
        assert torch.equal(again, clean)
        event(f"images embedded again: {cache.images_embedded}")


def tiny_run_config(out: Path, cache: Path):
    flags = {"dataset": "tiny_synthetic", "backbone": "vit_tiny_random", "image_size": 16,
             "method": "simplecil", "scenario": "B0Inc2", "out": str(out),
             "cache_dir": str(cache)}
    return make_config(flags=flags, sets=["keep_checkpoints=all"])


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_dataset):
    tmp = tmp_path_factory.mktemp("run")
    results = run(tiny_run_config(tmp / "run", tmp / "c"), echo=lambda *_: None, progress=False)
    return tmp, results


def run_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".json",
                                                                              ".safetensors"))


@fuzz(12)
@given(st.data(), MUTATIONS)
def test_damaged_run_folders_resume_to_the_clean_result_or_a_clean_error(clean_run, data, ops):
    src, clean = clean_run
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        victim = data.draw(st.sampled_from(run_files(Path(tmp))))
        victim.write_bytes(mutate(victim.read_bytes(), ops, data.draw))
        got = outcome(lambda: run(tiny_run_config(Path(tmp) / "run", Path(tmp) / "c"),
                                  echo=lambda *_: None, progress=False))
        if not isinstance(got, RetainError):
            assert strict_json(got["accuracy_matrix"]) == strict_json(clean["accuracy_matrix"])
            assert [s["correct"] for s in got["stages"]] == \
                [s["correct"] for s in clean["stages"]]


@fuzz(30)
@given(st.data(), MUTATIONS)
def test_show_trusts_a_damaged_run_folder_only_when_its_numbers_are_the_clean_ones(
        clean_run, data, ops):
    src, clean = clean_run
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(src / "run", Path(tmp) / "run")
        victim = data.draw(st.sampled_from(run_files(Path(tmp))))
        victim.write_bytes(mutate(victim.read_bytes(), ops, data.draw))
        got = outcome(lambda: trusted_results(Path(tmp) / "run"))
        if not isinstance(got, RetainError):
            results, _ = got
            assert [s["correct"] for s in results["stages"]] == \
                [s["correct"] for s in clean["stages"]]
            assert [s["total"] for s in results["stages"]] == \
                [s["total"] for s in clean["stages"]]


# ------------------------------------------------------------------------- hostile folders

def png(value: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((3, 4), value, np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def bomb_png(side: int = 30000) -> bytes:
    """A PNG whose header claims side x side gray pixels (decoding would need ~GBs)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        import struct

        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    import struct

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(
        b"\0" * 64)) + chunk(b"IEND", b"")


BENIGN = ["good", "good", "sub", "dir_named_png", "text"]
HOSTILE = ["zero", "junk", "truncated", "fifo", "loop", "ancestor_loop", "outside",
           "outside_file", "other_class", "dangling", "eps", "bomb", "same_file"]


def make_entry(kind: str, cls: Path, i: int, outside: Path, other: str) -> list[str]:
    """Create entry ``i`` of ``kind`` in class folder ``cls``; the images it should yield."""
    name = cls / f"e{i}.png"
    if kind == "good":
        name.write_bytes(png(10 * i))
        return [str(name)]
    if kind == "sub":
        (cls / f"s{i}").mkdir()
        (cls / f"s{i}" / "a.png").write_bytes(png(i))
        return [str(cls / f"s{i}" / "a.png")]
    if kind == "dir_named_png":
        name.mkdir()
        (name / "b.png").write_bytes(png(i))
        return [str(name / "b.png")]
    if kind == "text":
        (cls / f"n{i}.txt").write_text("notes")
        return []
    good = png(7)
    actions = {
        "zero": lambda: name.write_bytes(b""),
        "junk": lambda: name.write_bytes(b"\x89PNG junk" + bytes(range(40))),
        "truncated": lambda: name.write_bytes(good[: len(good) // 2]),
        "fifo": lambda: os.mkfifo(name),
        "loop": lambda: (cls / f"l{i}").symlink_to(".."),
        "ancestor_loop": lambda: (cls / f"l{i}").symlink_to("../.."),
        "outside": lambda: (cls / f"o{i}").symlink_to(outside),
        "outside_file": lambda: name.symlink_to(outside / "x.png"),
        "other_class": lambda: (cls / f"c{i}").symlink_to(Path("..") / other),
        "dangling": lambda: name.symlink_to(cls / "missing.png"),
        "eps": lambda: name.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"),
        "bomb": lambda: name.write_bytes(bomb_png()),
        "same_file": lambda: ((cls / "aa.png").write_bytes(good), name.symlink_to(cls / "aa.png")),
    }
    actions[kind]()
    return []


@fuzz(50)
@given(st.lists(st.lists(st.sampled_from(BENIGN + HOSTILE), max_size=4), min_size=2,
                max_size=3))
def test_hostile_folder_trees_fail_cleanly_naming_the_file(tree):
    with tempfile.TemporaryDirectory() as tmp:
        root, outside = Path(tmp) / "root", Path(tmp) / "outside"
        outside.mkdir()
        (outside / "x.png").write_bytes(png(99))
        names = [f"k{c}" for c in range(len(tree))]
        expected = []
        for c, kinds in enumerate(tree):
            for part in ("train", "test"):
                (root / part / names[c]).mkdir(parents=True)
            (root / "test" / names[c] / "t.png").write_bytes(png(c))
            for i, kind in enumerate(kinds):
                other = names[(c + 1) % len(names)]
                expected += [(p, c) for p in make_entry(kind, root / "train" / names[c], i,
                                                        outside, other)]
        hostile = any(k in HOSTILE for kinds in tree for k in kinds)
        empty = len({c for _, c in expected}) < len(tree)

        def load_and_decode():
            bundle = create_dataset("imagefolder", root=root).load()
            for split in (bundle.train, bundle.test):
                for i in range(len(split)):
                    split.image(i)
            return bundle

        got = outcome(load_and_decode)
        assert isinstance(got, RetainError) == (hostile or empty), (tree, got)
        if not isinstance(got, RetainError):
            assert sorted(zip(got.train.data.tolist(), got.train.targets.tolist(),
                              strict=True)) == sorted(expected)
