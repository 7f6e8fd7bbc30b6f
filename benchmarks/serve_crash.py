"""Crash test of `retain serve`: kill -9 the server at random moments during learn jobs.

One state folder, reused across trials (as a real deployment restarts into its folder). Each
trial starts the server (learning in a separate process), posts a learn job of one new class,
waits a random time drawn uniformly from [0, D], sends SIGKILL to the server, and checks that
its learn process died with it. D is the median duration of the uninterrupted jobs seen so far
(a first one measured alone, then every trial whose job ended before its kill), so the kills
fall inside the jobs as the machine's load changes; whether the job was still running at the
kill is recorded (polled just before it).
After the restart it checks that

- the server serves the highest version complete on disk (state + metadata, hash verified by
  loading it), and that version is the one before the trial or the one the job was publishing;
- /versions lists exactly the version folders on disk, each with its parent among the earlier
  versions and its recorded sha256 matching its state file;
- no temporary version folder and no job folder is left, and a prediction names that version.

    PYTHONPATH=. python3 benchmarks/serve_crash.py [--run RUN_DIR] [--trials 20]

Writes benchmarks/results/serve_crash.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import DEFAULT_RUN, ROOT, TOKEN, conditions, shape, start_server  # noqa: E402

from retain.backbones.base import sha256_file  # noqa: E402
from retain.serve.store import VersionStore  # noqa: E402

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def post_learn(url: str, name: str, kind: str, n: int = 20) -> dict:
    files = [("files", (f"{name}/{i}.png", shape(kind, 7000 + i), "image/png"))
             for i in range(n)]
    r = httpx.post(url + "/learn", files=files, headers=AUTH, timeout=120)
    r.raise_for_status()
    return r.json()


def check(url: str, state: Path, before: int, publishing: int) -> dict:
    """The invariants after a restart; returns what was found."""
    store = VersionStore(state)
    health = httpx.get(url + "/health", timeout=60).json()
    listed = httpx.get(url + "/versions", timeout=60).json()
    on_disk = store.numbers()
    folders = sorted(p.name for p in store.versions.iterdir())
    problems = []
    if health["version"] != on_disk[-1]:
        problems.append(f"serves {health['version']}, latest on disk {on_disk[-1]}")
    if health["version"] not in (before, publishing):
        problems.append(f"serves {health['version']}, expected {before} or {publishing}")
    if [v["version"] for v in listed["versions"]] != on_disk:
        problems.append("/versions differs from the folders on disk")
    if any(f.startswith(".") for f in folders):
        problems.append(f"temporary folders left: {folders}")
    if (state / "jobs").exists() and any((state / "jobs").iterdir()):
        problems.append("job folders left")
    for v in listed["versions"]:
        if v["parent"] is not None and v["parent"] >= v["version"]:
            problems.append(f"version {v['version']} has parent {v['parent']}")
        if sha256_file(store.folder(v["version"]) / "state.safetensors") != v["sha256"]:
            problems.append(f"version {v['version']} fails its sha256")
    p = httpx.post(url + "/predict", files=[("files", ("x.png", shape("ring", 1), "image/png"))],
                   timeout=60).json()
    if p.get("version") != health["version"]:
        problems.append(f"prediction answered by {p.get('version')}")
    return {"served": health["version"], "published": health["version"] == publishing,
            "problems": problems}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=DEFAULT_RUN)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--learn-nice", type=int, default=0,
                    help="CPU priority of the learn processes (default 0 here: at the server's "
                         "default 19 a job on a busy machine takes minutes, which changes no "
                         "outcome, only the time the 20 trials take)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                    "serve_crash.json")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="serve-crash-"))
    state = tmp / "state"
    out = {"run": str(args.run), "conditions": conditions(), "learn_nice": args.learn_nice,
           "trials": []}
    try:
        nice = ("--learn-nice", str(args.learn_nice))
        proc, url = start_server(args.run, state, *nice)  # calibration: an uninterrupted job
        t0 = time.perf_counter()
        job = post_learn(url, "calibration", "ring")
        while httpx.get(f"{url}/jobs/{job['job']}").json()["state"] in ("queued", "running"):
            time.sleep(0.1)
        duration = time.perf_counter() - t0
        proc.terminate()
        proc.wait(60)
        out["uninterrupted_job_seconds"] = round(duration, 2)
        print(f"an uninterrupted learn job takes {duration:.1f} s", flush=True)
        durations = [duration]
        for trial in range(args.trials):
            proc, url = start_server(None, state, *nice)
            before = httpx.get(url + "/health").json()["version"]
            delay = rng.uniform(0, float(np.median(durations)))
            t0 = time.perf_counter()
            job = post_learn(url, f"class{trial}", ("ring", "bar", "cross", "box")[trial % 4])
            running = True
            while time.perf_counter() - t0 < delay:
                if running and httpx.get(f"{url}/jobs/{job['job']}").json()["state"] == "done":
                    running = False
                    durations.append(time.perf_counter() - t0)
                time.sleep(min(0.2, max(0.0, delay - (time.perf_counter() - t0))))
            workers = children(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            time.sleep(1.0)
            orphans = [w for w in workers if alive(w)]
            proc, url = start_server(None, state, *nice)
            found = check(url, state, before, job["version"])
            if orphans:
                found["problems"].append(f"learn processes outlived the server: {orphans}")
            proc.terminate()
            proc.wait(60)
            out["trials"].append({"trial": trial, "kill_after_s": round(delay, 2),
                                  "job_running_at_kill": running,
                                  "before": before, "publishing": job["version"],
                                  "workers_at_kill": len(workers), **found})
            print(f"trial {trial:2d}: killed after {delay:5.2f} s "
                  f"({'during' if running else 'after'} the job), serves {found['served']} "
                  f"({'new' if found['published'] else 'previous'}), "
                  f"{'ok' if not found['problems'] else found['problems']}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t = out["trials"]
    out["summary"] = {"trials": len(t), "ok": sum(not x["problems"] for x in t),
                      "killed_during_job": sum(x["job_running_at_kill"] for x in t),
                      "served_new": sum(x["published"] for x in t),
                      "served_previous": sum(not x["published"] for x in t)}
    print(out["summary"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
