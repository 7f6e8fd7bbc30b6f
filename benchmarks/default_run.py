"""Wall time of the README's main job, ``retain run`` with no arguments, as a user meets it.

Two runs of ``python -m retain.cli run --quiet`` (what the ``retain`` entry point runs) into a
temporary run folder: the first on an empty feature cache (every image through EfficientNet-Lite0
at 224 px), the second with ``--fresh`` on the filled cache (the method relearns; no image is
embedded again). Records the CPU seconds of each run too (user + system, all its threads) and
the load average before and after: on a shared machine the wall time is only as good as the
quiet it was measured in, while the CPU time changes much less with the load (on a quiet
machine with c cores the wall time lies between CPU time / c and the CPU time).

    python benchmarks/default_run.py [--label NAME] [-- extra retain run flags]

Writes benchmarks/results/default_run[-NAME].json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from retain.runner import cpu_name  # the fingerprint every results.json records

HERE = Path(__file__).resolve().parent


def timed_run(argv: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, stdout) of one ``retain run``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "retain.cli", "run", "--quiet", *argv], env=env,
                       capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise SystemExit(f"retain run failed:\n{p.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="")
    ap.add_argument("extra", nargs="*", help="more `retain run` flags (after --)")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--out", f"{tmp}/run", "--cache-dir", f"{tmp}/cache", *args.extra]
        load_before = os.getloadavg()
        fresh_s, fresh_cpu, _ = timed_run(common, env)
        cached_s, cached_cpu, out = timed_run([*common, "--fresh"], env)
        load_after = os.getloadavg()
        results = json.loads(Path(f"{tmp}/run/results.json").read_text())
    row = {"label": args.label or "default", "argv": ["retain", "run", *args.extra],
           "fresh_cache_s": round(fresh_s, 1), "cached_s": round(cached_s, 1),
           "fresh_cache_cpu_s": round(fresh_cpu, 1), "cached_cpu_s": round(cached_cpu, 1),
           "images_embedded_first_run": 5000,
           "avg_incremental_accuracy": results["summary"]["avg_incremental_accuracy"],
           "last_accuracy": results["summary"]["last_accuracy"],
           "machine": {"cpus": os.cpu_count(), "cpu": cpu_name(),
                       "affinity": len(os.sched_getaffinity(0)),
                       "loadavg_before": [round(x, 2) for x in load_before],
                       "loadavg_after": [round(x, 2) for x in load_after],
                       "python": platform.python_version(), "device": results["environment"]}}
    name = f"default_run-{args.label}.json" if args.label else "default_run.json"
    (HERE / "results" / name).write_text(json.dumps(row, indent=2) + "\n")
    print("| run | wall s | CPU s |\n|---|---|---|")
    print(f"| fresh cache (5000 images embedded) | {fresh_s:.1f} | {fresh_cpu:.1f} |")
    print(f"| cached features (--fresh) | {cached_s:.1f} | {cached_cpu:.1f} |")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} on "
          f"{len(os.sched_getaffinity(0))} CPUs; A_B {100 * row['last_accuracy']:.1f} %")
    print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
