"""Predict latency and throughput of `retain serve`, idle and while a learn job runs.

A server is started on 127.0.0.1 (a free port) from a finished run folder (default: the
README's `retain run`, SimpleCIL on EfficientNet-Lite0 over MNIST-5k), learning in its default
mode (a separate process at nice 19). A bounded load generator (C client threads, each with one
keep-alive connection and one request in flight, one MNIST test image per request) measures,
for C = 1 and C = 8, after a warm-up at both concurrencies (every batch size a forward pass
may see has run once):

- idle: p50/p99 latency and throughput over two idle periods of the same length, one just
  before and one just after the learn job (so slow drifts of the machine's load fall on both);
- during a learn job of 2 new classes (synthetic 28x28 shapes, N images each, posted after the
  clients have started): the same over the requests that started after the job was posted and
  ended before it was done, the failures over the whole phase, and the version that answered
  every response (before the swap the old one, after it the new one).

Pass criteria of issue #12: p99 during learning within 2x of idle, no failed request, every
response names its version. The machine's load average is recorded with each phase: on a
shared machine the figures include other people's work.

    PYTHONPATH=. python3 benchmarks/serve_load.py [--run RUN_DIR] [--idle-seconds 45]

Writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN = ROOT / "runs" / "simplecil-mnist5k-B0Inc2-s1993"
TOKEN = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir: Path | None, state: Path, *extra: str, log=None) -> tuple:
    """A `retain serve` process on 127.0.0.1; returns (process, url) once /health answers."""
    import httpx

    port = free_port()
    argv = [sys.executable, "-m", "retain.cli", "serve", *([str(run_dir)] if run_dir else []),
            "--state", str(state), "--port", str(port), "--token", TOKEN, *extra]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, env=env, stdout=log or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 600:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError("server did not answer within 600 s")


def png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, "PNG")
    return b.getvalue()


def shape(kind: str, seed: int) -> bytes:
    """A 28x28 gray image (white on black, MNIST-like) of a shape at a random place and size."""
    rng = np.random.RandomState(seed)
    im = Image.new("L", (28, 28))
    d = ImageDraw.Draw(im)
    x, y, r = rng.randint(9, 19), rng.randint(9, 19), rng.randint(5, 9)
    w = int(rng.randint(2, 4))
    if kind == "ring":
        d.ellipse([x - r, y - r, x + r, y + r], outline=255, width=w)
    elif kind == "bar":
        d.rectangle([x - r, y - 1, x + r, y + 1], fill=255)
    elif kind == "cross":
        d.line([x - r, y - r, x + r, y + r], fill=255, width=w)
        d.line([x - r, y + r, x + r, y - r], fill=255, width=w)
    else:  # box
        d.rectangle([x - r, y - r, x + r, y + r], outline=255, width=w)
    return png(np.asarray(im))


def mnist_images(n: int) -> list[bytes]:
    from retain.datasets import create_dataset

    test = create_dataset("mnist5k").load().test
    return [png(test.data[i]) for i in range(n)]


def client(url: str, images: list[bytes], budget: int, stop: threading.Event,
           records: list, lock: threading.Lock, offset: int, until: float) -> None:
    import httpx

    assert url.startswith("http://127.0.0.1:"), "the load generator only targets 127.0.0.1"
    with httpx.Client(base_url=url, timeout=120) as c:
        for i in range(budget):
            if stop.is_set() or time.perf_counter() > until:
                return
            data = images[(offset + i) % len(images)]
            t0 = time.perf_counter()
            try:
                r = c.post("/predict", files=[("files", ("x.png", data, "image/png"))])
                ok, version = r.status_code == 200, r.json().get("version")
            except (httpx.HTTPError, ValueError):
                ok, version = False, None
            with lock:
                records.append((t0, time.perf_counter(), ok, version))


def run_clients(url: str, images: list[bytes], clients: int, budget: int,
                seconds: float = 1e9, during=None) -> tuple[list, dict]:
    """``clients`` threads with at most ``budget`` requests each, for at most ``seconds``;
    ``during()`` runs meanwhile in this thread (a learn job) and stops the clients when it
    returns."""
    records, lock, stop = [], threading.Lock(), threading.Event()
    until = time.perf_counter() + seconds
    threads = [threading.Thread(target=client, args=(url, images, budget, stop, records, lock,
                                                     k * 997, until)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    info = {}
    if during is not None:
        info = during()
        stop.set()
    for t in threads:
        t.join()
    info["wall"] = time.perf_counter() - t0
    return records, info


def summary(records: list, wall: float | None = None) -> dict:
    lat = np.array([(b - a) * 1000 for a, b, ok, _ in records if ok])
    span = wall or (max(r[1] for r in records) - min(r[0] for r in records))
    return {"requests": len(records), "failed": sum(1 for r in records if not r[2]),
            "without_version": sum(1 for r in records if r[3] is None),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "throughput_rps": round(len(lat) / span, 2),
            "versions": dict(Counter(r[3] for r in records))}


def learn_job(url: str, kinds: tuple[str, str], per_class: int, warmup: float):
    """Post a learn job of two new classes after ``warmup`` s; wait until it is done."""
    import httpx

    def run() -> dict:
        time.sleep(warmup)
        files = [("files", (f"{k}/{i}.png", shape(k, 1000 * j + i), "image/png"))
                 for j, k in enumerate(kinds) for i in range(per_class)]
        with httpx.Client(base_url=url, timeout=120) as c:
            t_post = time.perf_counter()
            r = c.post("/learn", files=files, headers={"Authorization": f"Bearer {TOKEN}"})
            r.raise_for_status()
            job = r.json()["job"]
            while (j := c.get(f"/jobs/{job}").json())["state"] in ("queued", "running"):
                time.sleep(0.2)
            t_done = time.perf_counter()
        return {"t_post": t_post, "t_done": t_done, "job": j}

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=DEFAULT_RUN)
    ap.add_argument("--idle-seconds", type=float, default=45.0,
                    help="length of each idle period (one before, one after the learn job)")
    ap.add_argument("--per-class", type=int, default=50, help="images per new class")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                    "serve_load.json")
    args = ap.parse_args()
    if not (args.run / "results.json").is_file():
        sys.exit(f"{args.run} is no finished run folder: run `retain run` first")
    images = mnist_images(64)
    state = Path(tempfile.mkdtemp(prefix="serve-load-"))
    proc, url = start_server(args.run, state / "state")
    out = {"run": str(args.run), "conditions": conditions(), "phases": {}}
    try:
        for clients in (1, 8, 1):  # warm-up: every batch size has run once
            run_clients(url, images, clients, 12)
        pairs = iter([("ring", "bar"), ("cross", "box")])
        for clients in (1, 8):
            load0 = os.getloadavg()[0]
            before, b = run_clients(url, images, clients, 10**6, args.idle_seconds)
            load1 = os.getloadavg()[0]
            rec, info = run_clients(url, images, clients, 10**6,
                                    during=learn_job(url, next(pairs), args.per_class, 1.0))
            load2 = os.getloadavg()[0]
            after, a = run_clients(url, images, clients, 10**6, args.idle_seconds)
            idle = summary(before + after, b["wall"] + a["wall"]) | {
                "loadavg_1min": [round(load0, 2), round(load2, 2)],
                "p99_ms_before_after": [summary(before)["p99_ms"], summary(after)["p99_ms"]]}
            window = [r for r in rec if r[0] >= info["t_post"] and r[1] <= info["t_done"]]
            learning = summary(window, info["t_done"] - info["t_post"]) | {
                "failed_whole_phase": sum(1 for r in rec if not r[2]),
                "without_version_whole_phase": sum(1 for r in rec if r[3] is None),
                "versions_whole_phase": dict(Counter(r[3] for r in rec)),
                "learn_seconds": round(info["t_done"] - info["t_post"], 2),
                "job_state": info["job"]["state"], "new_version": info["job"]["version"],
                "loadavg_1min": round(load1, 2)}
            learning["p99_ratio"] = round(learning["p99_ms"] / idle["p99_ms"], 2)
            learning["pass"] = (learning["p99_ratio"] <= 2.0
                                and learning["failed_whole_phase"] == 0
                                and learning["without_version_whole_phase"] == 0
                                and learning["job_state"] == "done")
            out["phases"][f"{clients}_clients"] = {"idle": idle, "learning": learning}
            print(f"{clients} client(s): idle p50 {idle['p50_ms']} ms p99 {idle['p99_ms']} ms "
                  f"{idle['throughput_rps']} req/s | learning ({learning['learn_seconds']} s, "
                  f"{learning['requests']} req) p50 {learning['p50_ms']} ms p99 "
                  f"{learning['p99_ms']} ms ({learning['p99_ratio']}x) "
                  f"{learning['throughput_rps']} req/s, failed "
                  f"{learning['failed_whole_phase']}, versions "
                  f"{learning['versions_whole_phase']} -> "
                  f"{'pass' if learning['pass'] else 'FAIL'}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(state, ignore_errors=True)
    out["conditions"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"written {args.out}")


def conditions() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpus": os.cpu_count(), "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "loadavg_before": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "note": "CPU shared with other processes when loadavg exceeds the CPU count"}


if __name__ == "__main__":
    main()
