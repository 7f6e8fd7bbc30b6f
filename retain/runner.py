"""``run``: learn a stream task by task, evaluate after each, write everything atomically.

After each task the method's state (safetensors + JSON) and then ``results.json`` are written by
rename, so a run killed at any moment restarts after its last finished task. Each task re-seeds
torch, numpy and Python's ``random`` from (seed, task id), so a resumed run ends with the
same accuracy matrix as an uninterrupted one.

Nothing read back is trusted unverified: each stage records its checkpoint's sha256 (and the
checkpoint's side file keeps a copy of the counts), and a resume checks ``results.json``
(``verify.check_results``) and the checkpoint it loads (``verify.stage_state``). A run holds
``RUN_DIR/.lock`` while it works: a second run on the same folder is refused at once, naming
the holder's pid; the lock of a killed run is released by the kernel and taken over.
"""

from __future__ import annotations

import contextlib
import platform
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import metrics, preflight, report
from .backbones import create_backbone
from .config import RunConfig, comparable
from .context import Context, resolve_device
from .datasets import create_dataset, per_class_subset
from .distributed import Dist, check_method
from .errors import ConfigError, RetainError
from .evaluation import evaluate, task_inference_accuracy
from .features import FeatureCache, default_cache_dir
from .io import file_lock, write_json, write_tensors
from .methods import Method, create_method
from .methods.base import TASK_FREE, task_free_refusal
from .scenarios import TaskFree, make_scenario
from .scenarios.orders import with_task_order
from .verify import RESULTS_FORMAT, checkpoint_file, load_results, stage_state


@dataclass
class Run:
    """Everything a run is made of, built from a config (no training yet)."""

    config: RunConfig
    scenario: object  # ClassIncremental, TaskIncremental, PermutedStream, RotatedStream
    method: Method
    ctx: Context


def build(config: RunConfig, echo=lambda *_: None, dist: Dist | None = None) -> Run:
    """Check every input (``retain.preflight``), then load the data, the backbone and the
    method named in ``config``; ``echo`` says what is loading."""
    preflight.check_setting(config)
    echo(f"loading {config.dataset} ...")
    bundle = create_dataset(config.dataset, config.data_root).load()
    if config.subset:
        bundle = per_class_subset(bundle, **config.subset, seed=config.seed)
    scenario = make_scenario(bundle, config.scenario, seed=config.seed)
    if config.task_order:
        scenario = with_task_order(scenario, config.task_order)
    echo(f"loading backbone {config.backbone} ...")
    backbone = create_backbone(config.backbone, config.weights, config.image_size)
    backbone.preprocess = backbone.preprocess.with_overrides(config.preprocess)  # the effective
    method = create_method(config.method, backbone, **config.params)
    if isinstance(scenario, TaskFree):
        check_task_free(method)
    cache_root = None if not config.cache else Path(config.cache_dir or default_cache_dir())
    dist = dist or Dist()
    device = resolve_device(config.device)
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)  # one GPU per process
    ctx = Context(device=device, batch_size=config.batch_size,
                  autocast=config.autocast == "bf16", seed=config.seed,
                  cache=FeatureCache(cache_root), dist=dist)
    return Run(config, scenario, method, ctx)


def check_task_free(method: Method) -> None:
    """Refuse a method that needs task boundaries on a task-free stream."""
    if TASK_FREE not in method.tags:
        raise ConfigError(task_free_refusal(method.name))


def learning_units(scenario, task) -> list:
    """What the method learns during ``task``: the task, or its unmarked task-free segments."""
    return scenario.segments_of(task) if isinstance(scenario, TaskFree) else [task]


def run(config: RunConfig, *, fresh: bool = False, echo=print, progress: bool = True) -> dict:
    """Learn the stream of ``config`` (resuming in its run folder); returns the results dict.

    Under torchrun every process calls ``run``: they share the work (``retain.distributed``),
    rank 0 alone prints, holds the run lock and writes; every rank reads the same folder to
    resume, and every rank returns the same results."""
    run_dir = config.run_dir
    preflight.check_inputs(config, fresh=fresh)
    check_method(config.method)
    dist = Dist.from_env(resolve_device(config.device))
    try:
        echo = echo if dist.is_main else _silent
        with shared_run_lock(run_dir, echo, dist):
            if fresh and dist.is_main:
                clear(run_dir)
            dist.barrier()
            previous = load_previous(run_dir, config)
            r = build(config, echo, dist)
            r.ctx.progress = progress and dist.is_main
            results = previous or new_results(r)
            start = len(results["stages"])
            if start:
                restore(r.method, run_dir, results, start - 1, echo)
                echo(f"resuming {run_dir}: {start} of {len(r.scenario)} tasks already learned")
            for task in r.scenario[start:]:
                stage, state = learn_and_evaluate(r, task)
                dist.check_same(state, f"method {r.method.name} after task {task.id}")
                if dist.is_main:
                    save_stage(r, results, stage, state, run_dir)
                results = dist.broadcast_object(results)  # rank 0's, once written
                s = metrics.summary(*report.counts(results))
                echo(report.stage_line(stage, len(r.scenario), s))
            if dist.is_main:
                report.plot(results, run_dir)
            dist.barrier()
    finally:
        dist.close()
    echo("\n" + report.table(results))
    echo(f"\nresults in {run_dir}/results.json; figures accuracy_curve.png, accuracy_matrix.png")
    return results


def _silent(*_args, **_kw) -> None:
    pass


@contextlib.contextmanager
def shared_run_lock(run_dir: Path, echo, dist: Dist):
    """``run_lock`` held by rank 0 for all ranks; when rank 0 cannot take it (another live run
    holds the folder) every rank stops with its error."""
    with contextlib.ExitStack() as stack:
        error = None
        if dist.is_main:
            try:
                stack.enter_context(run_lock(run_dir, echo))
            except RetainError as e:
                error = e
        dist.check(error)
        yield


@contextlib.contextmanager
def run_lock(run_dir: Path, echo=print):
    """Hold ``run_dir/.lock`` (refused at once if a live run holds it); a folder this call
    created and left holding only the lock (the run failed before writing) is removed."""
    created = not run_dir.exists()

    def stale(pid: int) -> None:
        echo(f"taking over the lock of {run_dir} left by pid {pid}, which no longer runs")

    try:
        with file_lock(run_dir / ".lock", wait=False, what=f"run folder {run_dir}",
                       on_stale=stale):
            yield
    finally:
        with contextlib.suppress(OSError):
            if created and [p.name for p in run_dir.iterdir()] == [".lock"]:
                (run_dir / ".lock").unlink()
                run_dir.rmdir()


def learn_and_evaluate(r: Run, task) -> tuple[dict, dict[str, torch.Tensor]]:
    """Learn one task, evaluate on every seen task, measure time and memory; returns the stage
    record and the method's state after the task."""
    seed_everything(r.config.seed, task.id)
    if r.ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(r.ctx.device)
    embedded = r.ctx.cache.images_embedded
    t0 = time.perf_counter()
    units = learning_units(r.scenario, task)
    for unit in units:
        r.method.learn(unit, r.ctx)
    t1 = time.perf_counter()
    correct, total = evaluate(r.method, r.scenario[: task.id + 1], r.ctx, task.id)
    t2 = time.perf_counter()
    task_of = r.scenario.task_of if isinstance(r.scenario, TaskFree) else None
    inferred = task_inference_accuracy(r.method, r.scenario[: task.id + 1], r.ctx, task_of)
    state = r.method.state_dict()
    return {"task": task.id, "num_classes": task.num_seen, "new_classes": list(task.new_classes),
            "correct": correct.tolist(), "total": total.tolist(),
            "seconds_learn": t1 - t0, "seconds_eval": t2 - t1,
            "images_embedded": int(r.ctx.dist.sum(r.ctx.cache.images_embedded - embedded)),
            "parameters": r.method.parameter_counts(),
            "stored_bytes": sum(t.numel() * t.element_size() for t in state.values()),
            **({"task_inference_accuracy": inferred} if inferred is not None else {}),
            **({"segments": len(units)} if isinstance(r.scenario, TaskFree) else {}),
            **peak_memory(r.ctx.device)}, state


def seed_everything(seed: int, task_id: int) -> None:
    s = hash((seed, task_id)) % 2**32
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def peak_memory(device: torch.device) -> dict:
    """Peak memory of the stage on CUDA; on the CPU the process's peak RSS so far."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    out = {"peak_rss_mb_process": round(rss, 1)}
    if device.type == "cuda":
        out["peak_gpu_mb_stage"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def new_results(r: Run) -> dict:
    return {"format": RESULTS_FORMAT, "config": r.config.to_dict(), "method": r.method.name,
            "hparams": r.method.hparams(), "tags": sorted(r.method.tags),
            "uses_batch_information": r.method.uses_batch_information,
            "backbone": r.method.backbone.describe(),
            "preprocess": r.method.backbone.preprocess.describe(),  # the effective transform
            "dataset": r.scenario.bundle.source
            | {"name": r.scenario.bundle.name}, "class_order": r.scenario.class_order.tolist(),
            "class_names": list(r.scenario.class_names), "num_tasks": len(r.scenario),
            "task_sizes": r.scenario.sizes, "scenario_kind": r.scenario.kind,
            **({"task_free_segment": r.scenario.segment} if isinstance(r.scenario, TaskFree)
               else {}),
            "environment": environment(r.ctx.device, r.scenario.bundle)
            | ({"processes": r.ctx.dist.world_size} if r.ctx.dist.active else {}),
            "stages": []}


def environment(device: torch.device, bundle=None) -> dict:
    """The fingerprint that explains most reproduction differences: versions, device, the
    retain commit and, given the run's ``bundle``, the dataset's content keys and sizes (the
    weights' sha256 is in ``results["backbone"]``)."""
    import importlib.metadata
    import os
    import subprocess

    import timm

    env = {"python": sys.version.split()[0], "torch": torch.__version__,
           "timm": timm.__version__, "numpy": np.__version__, "platform": platform.platform(),
           "device": str(device), "threads": torch.get_num_threads(), "cpu": cpu_name(),
           "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        env |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    try:
        env["retain"] = importlib.metadata.version("retain")
    except importlib.metadata.PackageNotFoundError:
        env["retain"] = None
    try:
        env["retain_commit"] = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["retain_commit"] = None
    if bundle is not None:
        env["dataset_key"] = {"train": bundle.train.key, "test": bundle.test.key}
        env["dataset_size"] = {"train": len(bundle.train), "test": len(bundle.test)}
    return env


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def save_stage(r: Run, results: dict, stage: dict, state: dict[str, torch.Tensor],
               run_dir: Path) -> None:
    """Checkpoint first, then results: results.json never names a stage without its state.

    The stage records the sha256 of the checkpoint and of its JSON side file, which keeps a copy
    of every stage's counts so far (so altered counts in results.json are caught)."""
    t = stage["task"]
    stages = results["stages"] + [stage]
    ckpt = checkpoint_file(run_dir, t)
    sha = write_tensors(ckpt, state, metadata={"method": r.method.name, "task": str(t)})
    side = {"method": r.method.name, "task": t, "hparams": r.method.hparams(),
            "backbone": r.method.backbone.describe(), "checkpoint_sha256": sha,
            "counts": {"correct": [s["correct"] for s in stages],
                       "total": [s["total"] for s in stages]}}
    side_sha = write_json(ckpt.with_suffix(".json"), side)
    stage["checkpoint"] = {"file": str(ckpt.relative_to(run_dir)), "sha256": sha,
                           "json_sha256": side_sha}
    results["stages"].append(stage)
    results["summary"] = metrics.summary(*report.counts(results))
    results["accuracy_matrix"] = metrics.accuracy_matrix(*report.counts(results)).tolist()
    cache = r.ctx.cache
    if cache.root is not None:  # the entries used, for `retain verify` (same cache folder)
        before, folder = results.get("feature_cache") or {}, str(cache.root.absolute())
        used = set(before.get("entries", [])) if before.get("dir") == folder else set()
        results["feature_cache"] = {"dir": folder, "entries": sorted(used | cache.entries_used)}
    write_json(run_dir / "config.json", r.config.to_dict())
    write_json(run_dir / "results.json", results)
    if r.config.keep_checkpoints == "last":
        for old in (run_dir / "checkpoints").glob("task-*"):
            if not old.name.startswith(f"task-{t:03d}."):
                old.unlink(missing_ok=True)


def load_previous(run_dir: Path, config: RunConfig) -> dict | None:
    """The results of an earlier run of the same config in ``run_dir``, or None."""
    if not (run_dir / "results.json").exists():
        return None
    results = load_results(run_dir)
    if comparable(results["config"]) != comparable(config.to_dict()):
        diff = sorted(k for k, v in comparable(config.to_dict()).items()
                      if results["config"].get(k) != v)
        raise ConfigError(f"{run_dir} holds a run with another configuration (differs in "
                          f"{diff}); pass another --out, or --fresh to discard that run")
    return results


def restore(method: Method, run_dir: Path, results: dict, task: int, echo=print) -> None:
    """Load the state after stage ``task``, verified against ``results`` (verify.stage_state)."""
    method.load_state_dict(stage_state(run_dir, results, task))
    if "checkpoint" not in results["stages"][task]:
        echo(f"note: {run_dir}/results.json was written by an older retain and records no "
             f"checkpoint hash; {checkpoint_file(run_dir, task).name} is loaded unverified")


def clear(run_dir: Path) -> None:
    for name in ("results.json", "config.json", "accuracy_curve.png", "accuracy_matrix.png"):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
