"""SimpleCIL at the cost floor: backbone passes per image and wall time against one pass.

The floor of any frozen-backbone method is exactly one backbone pass per training image and one
per test image over the whole run. This script counts the images that actually go through the
backbone (a forward hook on the model, independent of the cache's own counter) while SimpleCIL
learns two offline streams (MNIST-5k B0Inc2 = the default run, 5 tasks; MNIST-5k B0Inc1, 10
tasks), and compares the run's wall time with the time of one plain pass over the same images (the
faster of two passes, measured after the runs).

    python benchmarks/simplecil_floor.py [--image-size 224] [--device auto]

Writes benchmarks/results/simplecil_floor.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from retain import ClassIncremental, create_backbone, create_dataset, create_method, evaluate
from retain.context import Context, resolve_device
from retain.features import FeatureCache, embed


def count_passes(model: torch.nn.Module) -> list[int]:
    seen = [0]
    model.register_forward_hook(lambda m, inp, out: seen.__setitem__(0, seen[0] + len(inp[0])))
    return seen


def run_stream(bundle, notation: str, backbone, ctx: Context) -> dict:
    scenario = ClassIncremental.from_notation(bundle, notation, seed=1993)
    method = create_method("simplecil", backbone)
    t0 = time.perf_counter()
    accs = []
    for task in scenario:
        method.learn(task, ctx)
        correct, total = evaluate(method, scenario[: task.id + 1], ctx, task.id)
        accs.append(correct.sum() / total.sum())
    return {"stream": f"mnist5k {notation}", "tasks": len(scenario),
            "seconds": time.perf_counter() - t0, "last_accuracy": float(accs[-1]),
            "avg_incremental_accuracy": float(np.mean(accs))}


def one_pass(backbone, bundle, device, batch_size: int) -> float:
    """Seconds of one plain frozen pass over every train and test image (no cache)."""
    t0 = time.perf_counter()
    for split in (bundle.train, bundle.test):
        embed(backbone, split, split.index, device=device, batch_size=batch_size)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    device = resolve_device(args.device)
    bundle = create_dataset("mnist5k").load()
    n_images = len(bundle.train) + len(bundle.test)
    rows = []
    backbone = create_backbone("efficientnet_lite0", image_size=args.image_size)
    passes = count_passes(backbone.model)
    for notation in ("B0Inc2", "B0Inc1"):
        passes[0] = 0
        ctx = Context(device=device, batch_size=args.batch_size, cache=FeatureCache())
        row = run_stream(bundle, notation, backbone, ctx)
        row["backbone_passes_per_image"] = passes[0] / n_images
        rows.append(row)
    single_pass = min(one_pass(backbone, bundle, device, args.batch_size) for _ in range(2))
    for row in rows:
        row["seconds_one_pass"] = single_pass
        row["time_vs_one_pass"] = row["seconds"] / single_pass
    out = {"images": n_images, "backbone": backbone.identity["name"],
           "image_size": backbone.preprocess.size, "device": str(device),
           "cpu_threads": torch.get_num_threads(), "platform": platform.platform(), "rows": rows}
    path = Path(__file__).parent / "results" / "simplecil_floor.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"SimpleCIL, {backbone.identity['name']} at {backbone.preprocess.size} px, {device}, "
          f"{n_images} images (train + test)\n")
    print("| stream | tasks | passes/image | run (s) | one pass (s) | run / one pass | Ā | A_B |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stream']} | {r['tasks']} | {r['backbone_passes_per_image']:.3f} | "
              f"{r['seconds']:.1f} | {r['seconds_one_pass']:.1f} | {r['time_vs_one_pass']:.2f} | "
              f"{100 * r['avg_incremental_accuracy']:.1f} | {100 * r['last_accuracy']:.1f} |")


if __name__ == "__main__":
    main()
