"""What verified, sharded cache writes and reads cost on top of the backbone pass.

A backbone that costs nothing (flattened 28x28 pixels, 784-d) isolates the cache: MNIST-5k's
4,000 training images embedded directly, through an empty on-disk cache (shards of 256 rows,
sha256, index rewritten per shard, fsync), and read back from disk (every shard hashed and
checked). CPU seconds (one torch thread) and wall seconds, median of 3.

    python3 benchmarks/cache_overhead.py
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time

import torch

from retain.backbones import create_backbone
from retain.datasets import create_dataset
from retain.features import FeatureCache, embed


def timed(fn) -> tuple[float, float]:
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def main() -> None:
    torch.set_num_threads(1)
    bb = create_backbone("pixels")
    bb = dataclasses.replace(bb, model=torch.nn.Flatten(), feature_dim=784)  # (B, 784)
    split = create_dataset("mnist5k").load().train
    rows = {"direct pass": [], "cache, first run (embed + write)": [],
            "cache, from disk (read + verify)": []}
    for _ in range(3):
        rows["direct pass"].append(timed(lambda: embed(bb, split, split.index, device="cpu")))
        with tempfile.TemporaryDirectory() as d:
            rows["cache, first run (embed + write)"].append(
                timed(lambda d=d: FeatureCache(d).features(bb, split)))
            rows["cache, from disk (read + verify)"].append(
                timed(lambda d=d: FeatureCache(d).features(bb, split)))
    print(f"{len(split)} images, 784-d float32 ({len(split) * 784 * 4 / 2**20:.1f} MiB)")
    for name, ts in rows.items():
        cpu = statistics.median(t[0] for t in ts)
        wall = statistics.median(t[1] for t in ts)
        print(f"{name:<36} cpu {cpu:6.3f} s   wall {wall:6.3f} s")


if __name__ == "__main__":
    main()
