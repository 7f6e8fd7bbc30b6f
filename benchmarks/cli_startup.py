"""How fast the ``retain`` command answers: ``--help``, ``list``, ``show``, an input error, and
the first line of ``retain run``.

Each command runs ``--repeat`` times in a fresh interpreter (``python -m retain.cli``, what the
``retain`` entry point runs) with ``PYTHONPATH`` set to ``--root``; the median wall time is
reported. ``run: first line`` is the time until ``retain run`` prints its first line (the run is
then stopped). Point ``--root`` at another checkout to measure it, e.g. the commit before a change:

    git archive COMMIT | tar -x -C /tmp/before
    python benchmarks/cli_startup.py --root /tmp/before --label before
    python benchmarks/cli_startup.py --label after

Writes benchmarks/results/cli_startup-<label>.json and prints a markdown table. Timings depend on
the machine's load: compare labels measured one after the other on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def fake_run_dir(folder: Path) -> Path:
    """A run folder with a small, well-formed results.json (2 tasks) for ``retain show``."""
    results = {"format": 1, "method": "simplecil", "num_tasks": 2,
               "config": {"method": "simplecil", "dataset": "mnist5k", "scenario": "B0Inc2",
                          "seed": 1993},
               "backbone": {"name": "efficientnet_lite0", "sha256": "0" * 64},
               "stages": [{"task": 0, "num_classes": 2, "correct": [95], "total": [100]},
                          {"task": 1, "num_classes": 4, "correct": [90, 96], "total": [100, 100]}]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def commands(run_dir: Path) -> dict[str, list[str]]:
    return {"--help": ["--help"],
            "list methods": ["list", "methods"],
            "list presets": ["list", "presets"],
            "show": ["show", str(run_dir)],
            "config error (--set sead=1)": ["run", "--set", "sead=1"],
            "yaml error": ["run", "--config", str(run_dir / "results.json") + ".missing"]}


def timed(argv: list[str], env: dict, cwd: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "retain.cli", *argv], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=300)
    return time.perf_counter() - t0, p.returncode


def first_line(argv: list[str], env: dict, cwd: Path, timeout: float = 120.0) -> float:
    """Seconds until the command writes its first line to stdout or stderr."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "retain.cli", *argv], env=env, cwd=cwd,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while not line.strip() and time.perf_counter() - t0 < timeout:
            line = p.stdout.readline()
            if not line and p.poll() is not None:
                break
        return time.perf_counter() - t0
    finally:
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(HERE.parent), help="checkout to measure")
    ap.add_argument("--label", default="after")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    root = Path(args.root).resolve()
    env = dict(os.environ, PYTHONPATH=str(root))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cmds = commands(fake_run_dir(tmp / "run"))
        rows = {}
        for name, argv in cmds.items():
            times, codes = zip(*(timed(argv, env, tmp) for _ in range(args.repeat)), strict=True)
            rows[name] = {"median_s": round(statistics.median(times), 3),
                          "min_s": round(min(times), 3), "exit_codes": sorted(set(codes))}
        firsts = [first_line(["run", "--out", str(tmp / "r"), "--cache-dir", str(tmp / "c")],
                             env, tmp) for _ in range(min(args.repeat, 3))]
        rows["run: first line"] = {"median_s": round(statistics.median(firsts), 3),
                                   "min_s": round(min(firsts), 3)}
    load = os.getloadavg()
    out = {"label": args.label, "root": str(root), "repeat": args.repeat, "rows": rows,
           "machine": {"cpus": os.cpu_count(), "loadavg_1_5_15": [round(x, 2) for x in load],
                       "python": platform.python_version(), "platform": platform.platform()}}
    dest = HERE / "results" / f"cli_startup-{args.label}.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"| command ({args.label}, load {load[0]:.1f} on {os.cpu_count()} CPUs) "
          "| median s | min s |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['median_s']:.2f} | {r['min_s']:.2f} |")
    print(f"written {dest}")


if __name__ == "__main__":
    main()
