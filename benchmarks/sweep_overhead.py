"""Ray overhead: a sweep's wall time against the same runs run one after another.

The grid (digits B0Inc2 by default, EfficientNet-Lite0 at 32 px; SimpleCIL, RanPAC without
first-session adaptation, finetune for one epoch; seeds 1993 and 1994) runs

* as one ``retain sweep --num-cpus 2 --max-concurrent 2`` command (Ray start-up, cache warm-up
  and report included), and
* as one ``retain run`` command per point, one after another (each process using every core),

each with a fresh feature cache (the sequential runs share theirs on disk, as a user's would).
The ratio sweep / sequential is the figure; below 1 means the sweep pays for Ray and still wins
by running two runs at once.

    python benchmarks/sweep_overhead.py [--dataset digits]

Writes benchmarks/results/sweep_overhead.json. Measured on a 2-core machine shared with other
work, so both times are inflated; they were measured back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SPEC = {"description": "Ray overhead grid", "datasets": ["digits"], "scenarios": ["B0Inc2"],
        "backbones": ["efficientnet_lite0"], "seeds": [1993, 1994],
        "config": {"image_size": 32},
        "methods": ["simplecil",
                    {"method": "ranpac", "params": {"peft": "none", "projection_dim": 2000}},
                    {"method": "finetune", "params": {"epochs": 1}}]}


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    # Ray raises its workers' niceness by default; 0 here, like the sequential runs, so that on a
    # shared machine both sides compete equally with the other processes
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "RAY_worker_niceness": "0"})
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    from retain.sweep.grid import expand

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits")
    SPEC["datasets"] = [p.parse_args().dataset]

    work = Path(tempfile.mkdtemp(prefix="sweep_overhead_"))
    retain = [sys.executable, "-m", "retain.cli"]
    try:
        (work / "grid.yaml").write_text(yaml.safe_dump(SPEC))
        sweep = timed([*retain, "sweep", str(work / "grid.yaml"), "--out", str(work / "sweep"),
                       "--cache-dir", str(work / "cache-sweep"), "--num-cpus", "2",
                       "--max-concurrent", "2", "--quiet"])
        runs = []
        for p in expand(SPEC, work / "seq", []):
            cfg = {k: v for k, v in p.config.to_dict().items() if k not in ("out", "cache_dir")}
            path = work / f"{p.name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            runs.append({"run": p.name, "seconds": timed([
                *retain, "run", "--config", str(path), "--out", str(work / "seq" / p.name),
                "--cache-dir", str(work / "cache-seq"), "--quiet"])})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seq = sum(r["seconds"] for r in runs)
    out = {"setting": f"6 runs (3 methods x 2 seeds), {SPEC['datasets'][0]} B0Inc2, "
                      f"efficientnet_lite0 at 32 px, {os.cpu_count()} CPUs",
           "sweep_wall_seconds": sweep,
           "sequential_seconds": seq, "ratio_sweep_over_sequential": sweep / seq,
           "sequential_runs": runs}
    print(json.dumps(out, indent=2))
    path = Path(__file__).parent / "results" / "sweep_overhead.json"
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
