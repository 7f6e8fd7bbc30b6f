"""What a sweep worker executes: one ordinary run, or one cache warm-up. Plain functions (the
engine wraps them as Ray tasks); no Ray import here, so they run anywhere.

A run goes through ``retain.runner.run`` unchanged, in its own folder, so it resumes after its
last finished task exactly as ``retain run`` does. Its failure is caught and written to
``error.json`` in that folder (the other runs go on). A run holds an exclusive ``flock`` on
``<run>/.sweep-lock`` while it works, so a worker left over from a killed driver and the
resumed sweep never write the same folder at once (the second waits for the first to die).
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import time
import traceback
from pathlib import Path

from .status import ERROR_FILE, write_strict_json

LOCK_FILE = ".sweep-lock"


def execute_run(config: dict, threads: int = 1, after: object = None) -> dict:
    """Run (or resume) ``config`` in its folder; returns a short record for the progress line.
    ``after``: the warm-up's record, passed only so that Ray starts the run after it."""
    import torch

    from ..config import RunConfig
    from ..runner import run

    torch.set_num_threads(max(1, threads))
    cfg = RunConfig(**config)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with folder_lock(run_dir):
        (run_dir / ERROR_FILE).unlink(missing_ok=True)
        log = open(run_dir / "sweep.log", "a")  # noqa: SIM115 (closed below)
        try:
            results = run(cfg, echo=lambda *a: print(*a, file=log, flush=True), progress=False)
        except Exception as e:  # noqa: BLE001 (a sweep survives any failure of one run)
            record = failure(e, time.perf_counter() - t0)
            write_strict_json(run_dir / ERROR_FILE, record)
            return {"state": "failed", **record}
        finally:
            log.close()
    s = results.get("summary") or {}
    return {"state": "done", "seconds": time.perf_counter() - t0, "stages": len(results["stages"]),
            "avg_incremental_accuracy": s.get("avg_incremental_accuracy"),
            "last_accuracy": s.get("last_accuracy")}


def failure(e: BaseException, seconds: float) -> dict:
    return {"error": type(e).__name__, "message": str(e)[:2000],
            "traceback": traceback.format_exc()[-6000:], "seconds": seconds,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


@contextlib.contextmanager
def folder_lock(run_dir: Path):
    """An exclusive flock on the run folder, released when the holder exits or dies."""
    with open(Path(run_dir) / LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks while a left-over worker still holds it
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def warm_cache(configs: list[dict], threads: int = 1) -> dict:
    """Embed once every image the runs of ``configs`` will read through the frozen backbone.

    All configs share dataset, data root, backbone, weights, image size, numeric mode and cache
    folder. The images are the full train and test splits (every class stream is cut from them)
    plus the transformed splits of streams that make new images (permuted, rotated). Afterwards
    each run finds its frozen features in the cache and embeds nothing itself.
    """
    import torch

    from ..backbones import create_backbone
    from ..config import RunConfig
    from ..context import resolve_device
    from ..datasets import create_dataset
    from ..features import FeatureCache, default_cache_dir

    torch.set_num_threads(max(1, threads))
    t0 = time.perf_counter()
    cfgs = [RunConfig(**c) for c in configs]
    c = cfgs[0]
    bundle = create_dataset(c.dataset, c.data_root).load()
    backbone = create_backbone(c.backbone, c.weights, c.image_size)
    cache = FeatureCache(Path(c.cache_dir or default_cache_dir()))
    device = resolve_device(c.device)
    batch = c.batch_size or (16 if device.type == "cpu" else 128)
    splits = splits_to_warm(bundle, cfgs)
    for split in splits:
        cache.features(backbone, split, device=device, batch_size=batch,
                       autocast=c.autocast == "bf16")
    return {"images": sum(len(s) for s in splits), "images_embedded": cache.images_embedded,
            "seconds": time.perf_counter() - t0, "backbone_key": backbone.key,
            "runs": len(cfgs)}


def splits_to_warm(bundle, cfgs) -> list:
    """The full splits, plus one split per other content key that the streams produce."""
    from ..datasets.base import Split
    from ..scenarios import make_scenario
    from ..scenarios.orders import with_task_order

    plain = {bundle.train.key, bundle.test.key}
    extra: dict[str, list] = {}
    for scenario, seed, order in sorted({(c.scenario, c.seed, c.task_order) for c in cfgs},
                                        key=str):
        if re.fullmatch(r"(TaskFree\d*:)?(TIL-)?B\d+Inc\d+|(TaskFree\d*:)?Superclass-\w+",
                        scenario):
            continue  # class streams: subsets of the full splits
        stream = make_scenario(bundle, scenario, seed=seed)
        if order:
            stream = with_task_order(stream, order)
        for task in stream:
            for split in (task.train, task.test):
                if split.key not in plain:
                    extra.setdefault(split.key, []).append(split)
    return [bundle.train, bundle.test] + [Split.concat(parts) for parts in extra.values()]

