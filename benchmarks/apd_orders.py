"""APD's order robustness: the same tasks learned in five orders (Yoon et al., ICLR 2020).

For a task k (a fixed block of classes, wherever it comes in the stream), OPD_k is the max minus
the min of its final accuracy over the orders; MOPD = max_k OPD_k and AOPD = mean_k OPD_k (the
paper's order-robustness metrics; the official repository has no code for them). Task-aware
accuracy (the task id is given), in %.

Orders: on CIFAR-100 the official orders A-E of ``cifar100_apd_run.py`` (Split: 10 blocks of 10
consecutive fine-label ids; Superclass: the 20 superclasses, numbered as CIFAR's coarse labels).
On other datasets (n blocks of consecutive labels) the official Split orders restricted to blocks
0..n-1, keeping their relative order (for n = 5: A 01234, B 14203, C 01432, D 20431, E 24013).

    python benchmarks/apd_orders.py                                     # MNIST-5k, 5 x 2 classes
    python benchmarks/apd_orders.py --dataset fashion_mnist --per-class 400
    python benchmarks/apd_orders.py --dataset cifar100 --data-root ~/data          # Split 10 x 10
    python benchmarks/apd_orders.py --dataset cifar100 --data-root ~/data --superclass \\
        --param l1=6e-4                                                           # 20 x 5

A single order can also be run with the CLI: ``retain run --method apd --scenario TIL-B0Inc2
--task-order B`` (the same orders, from ``retain.scenarios.orders``).

Results are printed and written to ``benchmarks/results/apd_orders_<dataset>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import retain
from retain.context import Context, resolve_device
from retain.datasets.base import DataBundle
from retain.evaluation import evaluate
from retain.methods import create_method
from retain.scenarios.orders import SPLIT_ORDERS, SUPERCLASS_ORDERS
from retain.scenarios.streams import CIFAR100_SUPERCLASSES, TaskIncremental


def blocks_and_orders(bundle: DataBundle, superclass: bool, size: int
                      ) -> tuple[list[list[int]], dict[str, list[int]]]:
    """The class blocks (dataset label ids) and the five orders over them."""
    if superclass:
        index = {n: i for i, n in enumerate(bundle.class_names)}
        blocks = [[index[n] for n in g] for g in CIFAR100_SUPERCLASSES.values()]
        return blocks, SUPERCLASS_ORDERS
    n = bundle.num_classes // size
    blocks = [list(range(k * size, (k + 1) * size)) for k in range(n)]
    if n > 10:
        raise SystemExit(f"{n} blocks: the official orders cover 10; use --size")
    return blocks, {k: [b for b in order if b < n] for k, order in SPLIT_ORDERS.items()}


def subsample(bundle: DataBundle, train: int | None, test: int | None, seed: int) -> DataBundle:
    """At most ``train`` / ``test`` images per class (None: all), drawn with ``seed``."""
    rng = np.random.RandomState(seed)

    def sub(split, n):
        if n is None:
            return split
        pos = [rng.permutation(np.flatnonzero(split.targets == c))[:n]
               for c in range(bundle.num_classes)]
        return split.subset(np.sort(np.concatenate(pos)))

    return DataBundle(bundle.name, sub(bundle.train, train), sub(bundle.test, test),
                      bundle.class_names, bundle.source)


def run_order(bundle, blocks, order, backbone, params, ctx) -> dict:
    """Learn the blocks in ``order``; final accuracy per block (indexed by block id)."""
    class_order = [c for k in order for c in blocks[k]]
    stream = TaskIncremental(bundle, increment=len(blocks[0]), class_order=class_order)
    method = create_method("apd", backbone, **params)
    start = time.time()
    for task in stream:
        method.learn(task, ctx)
    correct, total = evaluate(method, stream[:], ctx, len(stream) - 1)
    final = {k: 100.0 * c / t for k, c, t in zip(order, correct, total, strict=True)}
    return {"order": order, "final": [final[k] for k in range(len(order))],
            "mean": float(100.0 * correct.sum() / total.sum()), "capacity": method.capacity(),
            "parameters": method.parameter_counts(), "seconds": round(time.time() - start, 1)}


def opd(finals: np.ndarray) -> dict:
    """finals (orders, tasks) -> OPD per task, MOPD and AOPD."""
    per_task = finals.max(0) - finals.min(0)
    return {"opd": per_task.round(2).tolist(), "mopd": float(per_task.max()),
            "aopd": float(per_task.mean())}


def parse(item: str) -> tuple[str, object]:
    """'l1=6e-4' -> ('l1', 0.0006); values that are not numbers stay strings (parsed later)."""
    key, value = item.split("=", 1)
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--superclass", action="store_true", help="CIFAR-100 superclasses, 20 x 5")
    ap.add_argument("--size", type=int, default=None, help="classes per task (default 2, or 10 "
                    "on CIFAR-100)")
    ap.add_argument("--per-class", type=int, default=None, help="training images per class")
    ap.add_argument("--test-per-class", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--param", action="append", default=[], help="APD hyper-parameter KEY=VALUE")
    ap.add_argument("--seed", type=int, default=1993)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    bundle = retain.create_dataset(args.dataset, root=args.data_root).load()
    bundle = subsample(bundle, args.per_class, args.test_per_class, args.seed)
    size = args.size or (10 if bundle.num_classes == 100 else 2)
    blocks, orders = blocks_and_orders(bundle, args.superclass, size)
    rgb = bundle.train.data.ndim == 4
    backbone = retain.create_backbone("pixels_rgb" if rgb else "pixels")
    params = {"epochs": args.epochs} | dict(parse(p) for p in args.param)
    ctx = Context(device=resolve_device("auto"), batch_size=256, seed=args.seed)
    runs = {}
    for name, order in orders.items():
        runs[name] = run_order(bundle, blocks, order, backbone, params, ctx)
        r = runs[name]
        print(f"order {name} {''.join(map(str, order)) if len(order) <= 10 else order}: "
              f"mean {r['mean']:.2f}  capacity {r['capacity']:.3f}  ({r['seconds']} s)  per task "
              + " ".join(f"{a:.1f}" for a in r["final"]), flush=True)
    summary = opd(np.array([r["final"] for r in runs.values()]))
    means = [r["mean"] for r in runs.values()]
    print(f"mean accuracy {np.mean(means):.2f} ± {np.std(means):.2f} over orders; "
          f"MOPD {summary['mopd']:.2f}  AOPD {summary['aopd']:.2f}")
    print("OPD per task: " + " ".join(f"{v:.1f}" for v in summary["opd"]))
    name = args.dataset + ("_superclass" if args.superclass else "")
    out = Path(args.out or Path(__file__).parent / "results" / f"apd_orders_{name}.json")
    result = {"dataset": args.dataset, "superclass": args.superclass, "blocks": blocks,
              "per_class": args.per_class, "test_per_class": args.test_per_class,
              "params": params, "seed": args.seed, "runs": runs, **summary,
              "mean_accuracy": float(np.mean(means))}
    out.write_text(json.dumps(result, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
