"""Backbone passes per image of a whole sweep: the shared feature cache against none.

A sweep of 4 frozen-feature methods (SimpleCIL, RanPAC without first-session adaptation, and the
linear-probe variants of finetune and joint) x 3 seeds on one dataset runs twice through
``retain.sweep`` on a local Ray:

* shared: one fresh cache folder for the whole sweep, warmed once before the runs;
* no cache: ``cache=false`` (each run keeps its features in memory only, no warm-up).

Every image that enters the backbone is counted by a global forward hook installed in every Ray
worker (``worker_process_setup_hook``), independently of the cache's own counter. The floor is
1 pass per image over the whole sweep with the shared cache, against 12 (one per run) without.

    python benchmarks/sweep_floor.py [--dataset digits] [--image-size 32] [--num-cpus 2]

Writes benchmarks/results/sweep_floor.json. Wall times on a shared 2-core machine are inflated
by the other processes; the pass counts are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

METHODS = ["simplecil", {"method": "ranpac", "params": {"peft": "none", "projection_dim": 2000}},
           {"name": "linear_probe", "method": "finetune",
            "params": {"freeze_backbone": True, "epochs": 2}},
           {"name": "joint_probe", "method": "joint",
            "params": {"freeze_backbone": True, "epochs": 2}}]
SEEDS = [1993, 1994, 1995]


def counting_hook(folder: str):
    """A setup hook for Ray workers: count the images entering EfficientNet-Lite0's top module
    (``_PooledEfficientNet``, whatever called it: warm-up, method or evaluation)."""

    def install():
        import torch

        def hook(module, inputs, output):
            if type(module).__name__ == "_PooledEfficientNet":
                with open(os.path.join(folder, f"{os.getpid()}.txt"), "a") as f:
                    f.write(f"{len(inputs[0])}\n")

        torch.nn.modules.module.register_module_forward_hook(hook)

    return install


def passes(folder: Path) -> int:
    return sum(int(line) for f in folder.glob("*.txt") for line in f.read_text().split())


def one_sweep(tag: str, args, work: Path, sets: list[str]) -> dict:
    import ray

    from retain.sweep.engine import run_sweep
    from retain.sweep.grid import expand

    counts = work / f"counts-{tag}"
    counts.mkdir()
    spec = {"datasets": [args.dataset], "scenarios": ["B0Inc2"],
            "backbones": ["efficientnet_lite0"], "seeds": SEEDS,
            "config": {"image_size": args.image_size}, "methods": METHODS}
    points = expand(spec, work / tag, sets)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": counting_hook(str(counts))})
    t0 = time.perf_counter()
    try:
        result = run_sweep(points, work / tag, max_concurrent=args.num_cpus, progress=False)
    finally:
        ray.shutdown()
    wall = time.perf_counter() - t0
    from retain.datasets import create_dataset

    bundle = create_dataset(args.dataset).load()
    images = len(bundle.train) + len(bundle.test)
    n = passes(counts)
    return {"runs": len(points), "finished": result["done"], "images": images,
            "backbone_passes": n, "passes_per_image": n / images, "wall_seconds": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-cpus", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="sweep_floor_"))
    try:
        shared = one_sweep("shared", args, work, [f"cache_dir={work / 'cache'}"])
        none = one_sweep("nocache", args, work, ["cache=false"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"setting": f"{args.dataset} B0Inc2, efficientnet_lite0 at {args.image_size} px, "
                      f"{len(METHODS)} methods x {len(SEEDS)} seeds, local Ray with "
                      f"{args.num_cpus} CPUs", "shared_cache": shared, "no_cache": none}
    print(json.dumps(out, indent=2))
    path = Path(__file__).parent / "results" / "sweep_floor.json"
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
