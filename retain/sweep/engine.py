"""The sweep driver: every grid point is an ordinary run, scheduled as a Ray task.

Order of work: write the plan (``sweep.json``); read each run folder's state (finished runs are
skipped, unfinished ones resume after their last task); check that the data and the weights
every remaining run needs are there (before Ray starts, so an offline reproduction fails at once
with the dataset's or backbone's own error); start Ray (a local instance sized by ``num_cpus``,
or the cluster at ``address`` / ``RAY_ADDRESS``); warm the feature cache once per (dataset,
backbone, image size, numeric mode, cache folder); then run the points, at most
``max_concurrent`` at a time, one GPU each where the cluster has GPUs. A failing run writes
``error.json`` and the others go on. Killing the driver loses nothing: the same command resumes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from ..errors import ConfigError, DataError, RetainError, WeightsError
from .grid import Point
from .status import ERROR_FILE, SWEEP_FILE, run_state, write_strict_json
from .tasks import execute_run, failure, warm_cache

WARM_FILE = "warmup.json"
LOCAL_OBJECT_STORE = 256 * 2**20  # bytes; tasks exchange configs and short records only


def run_sweep(points: list[Point], sweep_dir: str | Path, *, address: str | None = None,
              num_cpus: int | None = None, max_concurrent: int | None = None,
              warm: bool = True, unavailable: str = "fail", description: str = "",
              source: str = "", echo=print, progress: bool = True) -> dict:
    """Run every point not finished yet; returns the counts of runs per state."""
    sweep_dir = Path(sweep_dir)
    states = {p.name: run_state(p.config.run_dir)["state"] for p in points}
    todo = [p for p in points if states[p.name] != "done"]
    skipped = preflight(todo, unavailable)
    write_plan(sweep_dir, points, skipped, description, source)
    todo = [p for p in todo if p.name not in skipped]
    done = sum(s == "done" for s in states.values())
    echo(f"sweep {sweep_dir}: {len(points)} runs; {done} finished, {len(todo)} to run"
         + (f", {len(skipped)} skipped (data or weights not available)" if skipped else ""))
    for name, reason in skipped.items():
        echo(f"  skipped {name}: {reason.splitlines()[0][:160]}")
    counts = {"done": done, "failed": 0, "skipped": len(skipped), "total": len(points)}
    if not todo:
        return counts
    if (address or os.environ.get("RAY_ADDRESS")) and any(
            p.config.cache and not p.config.cache_dir for p in todo):
        echo("note: no --cache-dir, so each node keeps its own feature cache; pass a folder "
             "every node sees to embed each image once for the whole cluster")
    with ray_session(address, num_cpus) as ray:
        counts["done"] += schedule(ray, todo, sweep_dir, len(points) - len(skipped), done,
                                   max_concurrent, warm, echo, progress, counts)
    return counts


# ------------------------------------------------------------------------------- preflight


def preflight(points: list[Point], unavailable: str = "fail") -> dict[str, str]:
    """Load every dataset and backbone the points need, once each, before anything starts.

    A missing dataset or weights file raises its own clear error (``unavailable='fail'``), or
    leaves its points out (``'skip'``; returned as name -> reason). Other errors always raise.
    """
    if unavailable not in ("fail", "skip"):
        raise ConfigError(f"unavailable = {unavailable!r}; use fail or skip")
    found: dict[tuple, RetainError | None] = {}
    skipped: dict[str, str] = {}
    for p in points:
        c = p.config
        for need in (("data", c.dataset, c.data_root),
                     ("weights", c.backbone, c.weights, c.image_size)):
            if need not in found:
                found[need] = attempt(need)
            err = found[need]
            if err is None:
                continue
            if unavailable == "skip" and isinstance(err, DataError | WeightsError):
                skipped[p.name] = str(err)
                break
            raise type(err)(f"{err}\n(needed by sweep entry {p.entry} ({p.label}), run "
                            f"{p.name}; nothing was started)") from err
    return skipped


def attempt(need: tuple) -> RetainError | None:
    """Load the dataset or the backbone that ``need`` names; the error, or None."""
    from ..backbones import create_backbone
    from ..datasets import create_dataset

    try:
        if need[0] == "data":
            create_dataset(need[1], need[2]).load()
        else:
            create_backbone(*need[1:])
    except RetainError as e:
        return e
    return None


def write_plan(sweep_dir: Path, points: list[Point], skipped: dict[str, str],
               description: str, source: str) -> None:
    write_strict_json(sweep_dir / SWEEP_FILE, {
        "format": 1, "description": description, "source": source,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "points": [p.record() for p in points], "skipped": skipped})


# ------------------------------------------------------------------------------------- Ray


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None):
    """Ray, connected: the cluster at ``address`` (or ``RAY_ADDRESS``), else a local instance
    with ``num_cpus`` CPUs (default: all) started here and stopped on exit."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError("retain sweep runs on Ray, which is not installed: "
                          "pip install -e \".[sweep]\" (or pip install ray)") from e
    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline machines: no telemetry
        quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address or os.environ["RAY_ADDRESS"], **quiet)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     object_store_memory=LOCAL_OBJECT_STORE, **quiet)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def schedule(ray, todo: list[Point], sweep_dir: Path, total: int, done: int,
             max_concurrent: int | None, warm: bool, echo, progress: bool,
             counts: dict) -> int:
    """Warm the caches, run ``todo`` with at most ``max_concurrent`` in flight; returns how many
    finished."""
    from tqdm.auto import tqdm

    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
    limit = max_concurrent or (gpus or max(1, cpus // 2))
    threads = max(1, cpus // limit) if not gpus else max(1, cpus // max(gpus, 1))
    opts = {"num_cpus": threads, "num_gpus": 1 if gpus else 0, "max_retries": 0}
    echo(f"Ray: {cpus} CPUs, {gpus} GPUs; up to {limit} runs at once, {threads} thread(s) each"
         + (", one GPU each" if gpus else ""))
    run_task = ray.remote(execute_run)
    warm_refs = start_warmups(ray, todo, cpus, opts, threads) if warm else {}
    waiting = {ref: key for key, ref in warm_refs.items()}
    queue, inflight, finished = list(todo), {}, 0
    bar = tqdm(total=total, initial=done, unit="run", desc="sweep", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    say = bar.write if progress else echo
    try:
        while queue or inflight:
            while queue and len(inflight) < limit:
                p = queue.pop(next_point(queue, warm_refs, waiting))
                after = warm_refs.get(warm_key(p.config))
                ref = run_task.options(**opts, name=f"retain:{p.name}").remote(
                    p.config.to_dict(), threads, after)
                inflight[ref] = (p, time.perf_counter())
            ready, _ = ray.wait([*inflight, *waiting], num_returns=1)
            ref = ready[0]
            if ref in waiting:
                report_warmup(ray, ref, waiting.pop(ref), sweep_dir, say)
                continue
            p, t0 = inflight.pop(ref)
            rec = outcome(ray, ref, p, time.perf_counter() - t0)
            say(progress_line(p, rec))
            finished += rec["state"] == "done"
            counts["failed"] += rec["state"] == "failed"
            bar.update(1)
        for ref, key in waiting.items():  # warm-ups whose runs all finished first
            report_warmup(ray, ref, key, sweep_dir, say)
    finally:
        bar.close()
    return finished


def next_point(queue: list[Point], warm_refs: dict, waiting: dict) -> int:
    """The first point whose warm-up is over (or that has none), else the first: a run that
    waits for a long warm-up does not hold a slot that a ready run could use."""
    for i, p in enumerate(queue):
        ref = warm_refs.get(warm_key(p.config))
        if ref is None or ref not in waiting:
            return i
    return 0


def start_warmups(ray, todo: list[Point], cpus: int, opts: dict, threads: int) -> dict:
    """One warm-up task per (dataset, backbone, image size, numeric mode, cache folder)."""
    groups: dict[tuple, list[Point]] = {}
    for p in todo:
        if p.config.cache:
            groups.setdefault(warm_key(p.config), []).append(p)
    if not groups:
        return {}
    task = ray.remote(warm_up)
    n = max(threads, min(cpus, cpus // len(groups))) if not opts["num_gpus"] else threads
    return {key: task.options(**(opts | {"num_cpus": n}), name=f"retain:warm:{key[0]}").remote(
        [p.config.to_dict() for p in group], n) for key, group in groups.items()}


def warm_up(configs: list[dict], threads: int) -> dict:
    """``warm_cache``, never raising: a failed warm-up only means the runs embed themselves."""
    t0 = time.perf_counter()
    try:
        return warm_cache(configs, threads)
    except Exception as e:  # noqa: BLE001
        return {"failed": failure(e, time.perf_counter() - t0)}


def warm_key(c) -> tuple:
    from ..features import default_cache_dir

    return (c.dataset, c.data_root, c.backbone, c.weights, c.image_size, c.autocast,
            str(Path(c.cache_dir or default_cache_dir()).resolve()))


def report_warmup(ray, ref, key: tuple, sweep_dir: Path, say) -> None:
    rec = ray.get(ref)
    path = sweep_dir / WARM_FILE
    from .status import read_json_lenient

    log = read_json_lenient(path) if path.is_file() else []
    log.append({"dataset": key[0], "backbone": key[2], "image_size": key[4], "cache_dir": key[6],
                **rec})
    write_strict_json(path, log)
    if "failed" in rec:
        say(f"warm-up {key[0]} / {key[2]} failed ({rec['failed']['error']}: "
            f"{rec['failed']['message'][:120]}); its runs embed their own features")
    else:
        say(f"warm-up {key[0]} / {key[2]}: {rec['images_embedded']} of {rec['images']} images "
            f"embedded ({rec['seconds']:.0f}s), shared by {rec['runs']} runs")


def outcome(ray, ref, p: Point, seconds: float) -> dict:
    """The run's own record, or a failure written for it when its worker died (OOM, crash)."""
    try:
        return ray.get(ref)
    except Exception as e:  # noqa: BLE001 (worker crashed, out of memory, cancelled)
        rec = failure(e, seconds)
        rec["message"] = f"the worker died: {rec['message']}"[:2000]
        write_strict_json(Path(p.config.run_dir) / ERROR_FILE, rec)
        return {"state": "failed", **rec}


def progress_line(p: Point, rec: dict) -> str:
    c = p.config
    what = f"{p.label} {c.dataset} {c.scenario} {c.backbone} s{c.seed}"
    if rec["state"] != "done":
        return f"FAILED {what}  {rec['error']}: {rec['message'].splitlines()[0][:200]}"

    def pct(x):
        return "  -  " if x is None or x != x else f"{100 * x:5.1f}"

    return (f"done   {what}  Ā {pct(rec['avg_incremental_accuracy'])}  "
            f"A_B {pct(rec['last_accuracy'])}  {rec['seconds']:.0f}s")
