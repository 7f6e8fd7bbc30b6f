"""Backbone passes per image per task for the methods whose backbone is frozen (after task 0).

Every image that enters a ViT patch embedding is counted (a global forward hook installed by
this script only), during learning and during evaluation, task by task. The floor of a
frozen-backbone method is one pass per *new* training image and per *new* test image for each
frozen network it uses (APER uses two: the pre-trained and the adapted one), and zero for test
images embedded at an earlier task. Task 0 also includes first-session adaptation (epochs x
training images, plus augmentation), which is the method's own training cost.

    python benchmarks/frozen_floor.py [--methods simplecil ranpac layup aper] [--size 32]

Runs on MNIST-5k (300 train / 100 test images per class, B0Inc2) with a small random ViT, so
it measures the pass counting, not accuracy. Writes benchmarks/results/frozen_floor.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from timm.layers import PatchEmbed

from retain import ClassIncremental, create_backbone, create_dataset, create_method, evaluate
from retain.context import Context
from retain.datasets.base import DataBundle

FAST = {"ranpac": {"peft": "adapter", "epochs": 1, "projection_dim": 1000},
        "layup": {"peft": "vpt_deep", "epochs": 1, "layers": 2},
        "aper": {"peft": "adapter", "epochs": 1}}


def small_mnist(per_class_train: int, per_class_test: int) -> DataBundle:
    data = create_dataset("mnist5k").load()
    pick = [np.concatenate([np.flatnonzero(s.targets == c)[:n] for c in range(10)])
            for s, n in ((data.train, per_class_train), (data.test, per_class_test))]
    return DataBundle("mnist5k-small", data.train.subset(pick[0]), data.test.subset(pick[1]),
                      data.class_names)


def measure(name: str, bundle: DataBundle, size: int) -> list[dict]:
    counter = [0]

    def hook(module, inputs, output):
        if isinstance(module, PatchEmbed):
            counter[0] += len(inputs[0])

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        backbone = create_backbone("vit_tiny_random", image_size=size)
        method = create_method(name, backbone, **FAST.get(name, {}))
        scenario, ctx = ClassIncremental(bundle, increment=2), Context(batch_size=64)
        rows = []
        for task in scenario:
            counter[0] = 0
            method.learn(task, ctx)
            learn = counter[0]
            counter[0] = 0
            evaluate(method, scenario[: task.id + 1], ctx, task.id)
            rows.append({"task": task.id, "learn_passes_per_new_train_image":
                         learn / len(task.train), "eval_passes_per_new_test_image":
                         counter[0] / len(task.test), "old_test_images":
                         sum(len(t.test) for t in scenario[: task.id])})
        return rows
    finally:
        handle.remove()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["simplecil", "ranpac", "layup", "aper"])
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    bundle = small_mnist(300, 100)
    out = {name: measure(name, bundle, args.size) for name in args.methods}
    path = Path(__file__).parent / "results" / "frozen_floor.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print("| method | task | passes / new train image (learn) | passes / new test image (eval)"
          " | old test images re-embedded |")
    print("|---|---|---|---|---|")
    for name, rows in out.items():
        networks = rows[0]["eval_passes_per_new_test_image"]  # at task 0 every test image is new
        for r in rows:
            n_new = len(bundle.test) // 5
            again = (r["eval_passes_per_new_test_image"] - networks) * n_new / networks
            print(f"| {name} | {r['task']} | {r['learn_passes_per_new_train_image']:.2f} | "
                  f"{r['eval_passes_per_new_test_image']:.2f} | {again:.0f} of "
                  f"{r['old_test_images']} |")

if __name__ == "__main__":
    main()
