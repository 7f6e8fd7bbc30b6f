"""``retain verify RUN_DIR``: is a run folder what ``retain run`` wrote, and what to do if not.

A run folder is trusted only after these checks, which ``retain run`` (on resume) and
``retain show`` make too:
- ``results.json`` parses and is well-formed: types, one stage per task in order, counts
  ``0 <= correct <= total``, each task's test-set size the same at every stage, and the stored
  ``summary`` / ``accuracy_matrix`` equal to what the counts give;
- every checkpoint present has the sha256 that ``results.json`` recorded when it was written,
  its JSON side file too, and the side file's copy of the counts equals ``results.json``'s;
  the last stage's checkpoint (the one a resume loads) is present;
- ``config.json`` describes the same run as ``results.json``;
- the feature-cache entries the run used verify shard by shard (a bad shard does not change
  the run's numbers, but the next run deletes and recomputes it).

``--rollback`` truncates a run whose newest checkpoint fails to the last stage whose checkpoint
verifies (only possible with ``keep_checkpoints: all``); the same ``retain run`` command then
resumes from there. Otherwise ``--fresh`` starts over.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .errors import IntegrityError, RetainError
from .io import read_json, read_tensors, strict_json

HEX64 = re.compile(r"[0-9a-f]{64}")
RESULTS_FORMAT = 2  # 2: stages record their checkpoint's sha256; 1: older, unverifiable


def checkpoint_file(run_dir: Path, task: int) -> Path:
    return run_dir / "checkpoints" / f"task-{task:03d}.safetensors"


# ------------------------------------------------------------------------------ results.json

class _Check:
    """Raises one ``IntegrityError`` naming the file and the field that is wrong."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, ok: bool, field: str, why: str) -> None:
        if not ok:
            error = IntegrityError(
                f"{self.path}: field {field} {why}; the file was altered or damaged (`retain "
                f"verify {self.path.parent}` checks the whole folder; --fresh starts the run over)")
            error.problem = f"field {field} {why}"  # the reason alone (preflight's wording)
            raise error


def _int(v) -> bool:
    return type(v) is int


def _number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def check_results(results, path: Path) -> dict:
    """``results`` if it is a well-formed results.json (see the module doc), else an
    ``IntegrityError`` naming ``path`` and the first field that is wrong."""
    need = _Check(path)
    need(isinstance(results, dict), "(top level)", "is not a JSON object")
    need(results.get("format") in (1, RESULTS_FORMAT), "format",
         f"is {results.get('format')!r}, not 1 or {RESULTS_FORMAT}")
    cfg = results.get("config")
    need(isinstance(cfg, dict), "config", "is not an object")
    for key in ("method", "dataset", "scenario"):
        need(isinstance(cfg.get(key), str), f"config.{key}", "is not a string")
    need(_int(cfg.get("seed")), "config.seed", "is not an integer")
    bb = results.get("backbone")
    need(isinstance(bb, dict) and isinstance(bb.get("name"), str)
         and isinstance(bb.get("sha256"), str), "backbone", "lacks a name and a sha256")
    n = results.get("num_tasks")
    need(_int(n) and n >= 1, "num_tasks", f"is {n!r}, not a positive integer")
    stages = results.get("stages")
    need(isinstance(stages, list), "stages", "is not a list")
    need(len(stages) <= n, "stages", f"holds {len(stages)} stages, more than num_tasks = {n}")
    for i, st in enumerate(stages):
        _check_stage(need, st, i, stages, results["format"])
    used = results.get("feature_cache", {"dir": "", "entries": []})
    need(isinstance(used, dict) and isinstance(used.get("dir"), str)
         and isinstance(used.get("entries"), list)
         and all(isinstance(e, str) for e in used["entries"]), "feature_cache",
         "is not {dir: string, entries: [strings]}")
    _check_derived(need, results)
    return results


def _check_stage(need: _Check, st, i: int, stages: list, fmt: int) -> None:
    f = f"stages[{i}]"
    need(isinstance(st, dict), f, "is not an object")
    need(st.get("task") == i and _int(st.get("task")), f"{f}.task", f"is {st.get('task')!r}, "
         f"not {i}")
    need(_int(st.get("num_classes")) and st["num_classes"] >= 1, f"{f}.num_classes",
         "is not a positive integer")
    for key in ("correct", "total"):
        v = st.get(key)
        need(isinstance(v, list) and len(v) == i + 1 and all(_int(c) and c >= 0 for c in v),
             f"{f}.{key}", f"is not a list of {i + 1} non-negative integers")
    for j, (c, t) in enumerate(zip(st["correct"], st["total"], strict=True)):
        need(c <= t, f"{f}.correct[{j}]", f"= {c} exceeds {f}.total[{j}] = {t}")
        need(t == stages[j]["total"][j], f"{f}.total[{j}]", f"= {t}, but task {j + 1}'s test "
             f"set had {stages[j]['total'][j]} samples at stage {j}")
    for key in ("seconds_learn", "seconds_eval"):
        need(_number(st.get(key)) and st[key] >= 0, f"{f}.{key}", "is not a duration")
    if fmt >= 2:
        rec = st.get("checkpoint")
        want = f"checkpoints/task-{i:03d}.safetensors"
        need(isinstance(rec, dict) and rec.get("file") == want, f"{f}.checkpoint.file",
             f"is not {want}")
        for key in ("sha256", "json_sha256"):
            need(isinstance(rec.get(key), str) and HEX64.fullmatch(rec[key]) is not None,
                 f"{f}.checkpoint.{key}", "is not a sha256")


def _check_derived(need: _Check, results: dict) -> None:
    from . import metrics, report

    if not results["stages"]:
        return
    correct, total = report.counts(results)
    derived = {"summary": metrics.summary(correct, total),
               "accuracy_matrix": metrics.accuracy_matrix(correct, total).tolist()}
    for key, value in derived.items():
        if key in results:
            need(_same(strict_json(results[key]), strict_json(value)), key,
                 "differs from what the stages' counts give")


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if _number(a) and _number(b):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def load_results(run_dir: Path) -> dict:
    """The validated results.json of ``run_dir``."""
    path = run_dir / "results.json"
    return check_results(read_json(path), path)


# ------------------------------------------------------------------------------ checkpoints

def stage_state(run_dir: Path, results: dict, task: int) -> dict:
    """The method state after stage ``task``, from its checkpoint, verified against the hashes
    and counts in ``results``; an ``IntegrityError`` offering the way out otherwise."""
    try:
        return _verified_state(run_dir, results, task)
    except IntegrityError as e:
        raise IntegrityError(f"{e}. {way_out(run_dir, results, task)}") from e


def _verified_state(run_dir: Path, results: dict, task: int) -> dict:
    ckpt = checkpoint_file(run_dir, task)
    if not ckpt.is_file():
        raise IntegrityError(f"{ckpt} is missing, so {run_dir} cannot resume from task "
                             f"{task + 1}")
    rec = results["stages"][task].get("checkpoint")
    if rec is None:  # format 1: nothing recorded to check against
        return read_tensors(ckpt)
    state = read_tensors(ckpt, rec["sha256"])
    side = read_json(ckpt.with_suffix(".json"), rec["json_sha256"])
    kept = side.get("counts") if isinstance(side, dict) else None
    stages = results["stages"][: task + 1]
    if kept != {"correct": [s["correct"] for s in stages], "total": [s["total"] for s in stages]}:
        raise IntegrityError(f"the counts in {run_dir / 'results.json'} differ from those "
                             f"recorded with {ckpt}: results.json was altered")
    return state


def last_good_stage(run_dir: Path, results: dict, before: int) -> int | None:
    """The last stage < ``before`` whose checkpoint is present and verifies."""
    for t in range(before - 1, -1, -1):
        if checkpoint_file(run_dir, t).is_file():
            try:
                _verified_state(run_dir, results, t)
                return t
            except IntegrityError:
                continue
    return None


def way_out(run_dir: Path, results: dict, task: int) -> str:
    """The choice offered when stage ``task``'s checkpoint fails."""
    good = last_good_stage(run_dir, results, task)
    fresh = "pass --fresh to the same `retain run` command to start over"
    if good is None:
        return (f"No earlier checkpoint verifies (keep_checkpoints: last keeps only the newest), "
                f"so {fresh}")
    return (f"Choose: `retain verify {run_dir} --rollback` keeps the first {good + 1} task(s), "
            f"whose checkpoint verifies, and the same `retain run` command resumes from there; "
            f"or {fresh}")


def rollback(run_dir: Path, echo=print) -> int:
    """Truncate ``run_dir`` to its last stage whose checkpoint verifies; returns that count."""
    from . import metrics, report
    from .io import file_lock, write_json

    with file_lock(run_dir / ".lock", wait=False, what=str(run_dir)):
        results = load_results(run_dir)
        n = len(results["stages"])
        good = last_good_stage(run_dir, results, n)
        if good is None:
            raise IntegrityError(f"no checkpoint of {run_dir} verifies, so there is nothing to "
                                 "roll back to; pass --fresh to `retain run` to start over")
        results["stages"] = results["stages"][: good + 1]
        correct, total = report.counts(results)
        results["summary"] = metrics.summary(correct, total)
        results["accuracy_matrix"] = metrics.accuracy_matrix(correct, total).tolist()
        write_json(run_dir / "results.json", results)
        for old in (run_dir / "checkpoints").glob("task-*"):
            m = re.fullmatch(r"task-(\d+)\.(safetensors|json)", old.name)
            if m and int(m.group(1)) > good:
                old.unlink()
    echo(f"rolled {run_dir} back to {good + 1} of {n} tasks; run the same `retain run` "
         f"command (or `retain run --config {run_dir / 'config.json'}`) to resume")
    return good + 1


def trusted_results(run_dir: Path) -> tuple[dict, list[str]]:
    """results.json of ``run_dir`` once validated and checked against every checkpoint present
    (for ``retain show``), and notes on what could not be checked."""
    results = load_results(run_dir)
    notes, stages = [], results["stages"]
    for t in range(len(stages)):
        if checkpoint_file(run_dir, t).is_file():
            stage_state(run_dir, results, t)
    if stages and not checkpoint_file(run_dir, len(stages) - 1).is_file():
        notes.append(f"(checkpoints/task-{len(stages) - 1:03d}.safetensors is absent: the "
                     "counts were checked for consistency only)")
    elif stages and "checkpoint" not in stages[-1]:
        notes.append("(written by an older retain without checkpoint hashes: not verified)")
    return results, notes


# ------------------------------------------------------------------------------ retain verify

class Report:
    """Lines of a verification: ok, note or PROBLEM, each problem with what to run."""

    def __init__(self):
        self.lines: list[str] = []
        self.problems = 0

    def ok(self, text: str) -> None:
        self.lines.append(f"  ok       {text}")

    def note(self, text: str) -> None:
        self.lines.append(f"  note     {text}")

    def problem(self, text: str, fix: str) -> None:
        self.problems += 1
        self.lines.append(f"  PROBLEM  {text}\n           fix: {fix}")


def verify_run(run_dir: Path) -> Report:
    """Every check of the module doc on ``run_dir``, as a report."""
    rep = Report()
    fresh = f"retain run --config {run_dir / 'config.json'} --fresh"
    _check_lock(rep, run_dir)
    try:
        results = load_results(run_dir)
    except RetainError as e:
        rep.problem(str(e), f"restore results.json from a copy, or start over: {fresh}")
        return rep
    stages = results["stages"]
    rep.ok(f"results.json: {len(stages)} of {results['num_tasks']} tasks, counts consistent")
    _check_config(rep, run_dir, results, fresh)
    _check_checkpoints(rep, run_dir, results, fresh)
    _check_cache(rep, results)
    return rep


def _check_lock(rep: Report, run_dir: Path) -> None:
    from .io import lock_busy

    pid = lock_busy(run_dir / ".lock")
    if pid is not None:
        rep.note(f"a retain run (pid {pid or '?'}) is writing {run_dir} now; verify again when "
                 "it has finished")


def _check_config(rep: Report, run_dir: Path, results: dict, fresh: str) -> None:
    from .config import comparable

    path = run_dir / "config.json"
    try:
        config = read_json(path)
    except RetainError as e:
        rep.problem(str(e), f"rewrite it from results.json: python3 -c \"import json; "
                    f"json.dump(json.load(open('{run_dir}/results.json'))['config'], "
                    f"open('{path}', 'w'), indent=2)\"")
        return
    if not isinstance(config, dict) or comparable(config) != comparable(results["config"]):
        rep.problem(f"{path} describes another run than results.json",
                    f"rewrite it from results.json, or start over: {fresh}")
    else:
        rep.ok("config.json matches results.json")


def _check_checkpoints(rep: Report, run_dir: Path, results: dict, fresh: str) -> None:
    stages = results["stages"]
    for t in range(len(stages)):
        ckpt = checkpoint_file(run_dir, t)
        if not ckpt.is_file():
            if t == len(stages) - 1:
                rep.problem(f"{ckpt} is missing: the run cannot resume",
                            way_out(run_dir, results, t))
            elif results["config"].get("keep_checkpoints") == "all":
                rep.note(f"{ckpt.name} is absent although keep_checkpoints is all")
            continue
        try:
            _verified_state(run_dir, results, t)
        except IntegrityError as e:
            rep.problem(str(e), way_out(run_dir, results, t))
            continue
        rep.ok(f"{ckpt.relative_to(run_dir)}: sha256 and counts match results.json"
               if "checkpoint" in stages[t] else
               f"{ckpt.relative_to(run_dir)}: readable (older format: no hash recorded)")
    for p in sorted((run_dir / "checkpoints").glob("task-*.safetensors")):
        m = re.fullmatch(r"task-(\d+)\.safetensors", p.name)
        if m and int(m.group(1)) >= len(stages):
            rep.note(f"{p.name} belongs to no recorded stage (a run stopped between writing it "
                     "and results.json); resuming overwrites it")


def _check_cache(rep: Report, results: dict) -> None:
    from .features import inspect_entry

    used = results.get("feature_cache")
    if not isinstance(used, dict) or not isinstance(used.get("entries"), list):
        rep.note("no feature-cache entries recorded (in-memory cache, or an older retain)")
        return
    root = Path(str(used.get("dir")))
    for key in used["entries"]:
        folder = root / str(key)
        if not isinstance(key, str) or ".." in Path(key).parts or not folder.is_dir():
            rep.note(f"cache entry {folder} is absent (its features are embedded again when "
                     "needed)")
            continue
        problems, rows = inspect_entry(folder)
        for p in problems:
            rep.problem(f"cache {p}", "nothing: the next run that needs it deletes it and embeds "
                        f"its images again (or now: rm -r {folder})")
        if not problems:
            rep.ok(f"cache entry {folder}: {rows} rows verified")


def add_arguments(p) -> None:
    """The arguments of ``retain verify`` (hooked in by ``retain.cli.COMMANDS``)."""
    p.add_argument("run_dir", help="a run folder written by `retain run`")
    p.add_argument("--rollback", action="store_true",
                   help="truncate the run to its last stage whose checkpoint verifies")


def main(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise IntegrityError(f"{run_dir} is not a folder; pass a folder written by `retain run`")
    if args.rollback:
        rollback(run_dir)
        return 0
    rep = verify_run(run_dir)
    print(f"verify {run_dir}")
    print("\n".join(rep.lines))
    print(f"{rep.problems} problem(s)" if rep.problems else "all checks passed")
    return 1 if rep.problems else 0
