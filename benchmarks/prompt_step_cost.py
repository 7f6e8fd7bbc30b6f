"""Time per training step and per test image of the prompt methods, in frozen forward passes.

The unit is one plain frozen forward of the same ViT on the same batch (F). For each method:

* **train step**: the first task learned twice from scratch, with 1 and with 3 epochs, on
  ``--train`` images per class in batches of ``--batch``, with augmentation on (so the frozen
  query pass runs every step, as in the reference code); the difference over the extra steps is
  the time per step (per-task work such as statistics passes or k-means cancels out and is
  reported apart as ``task_extra_s``); as a multiple of one plain frozen forward of a batch of
  the same size. Augmentation itself (crop + flip per image) is timed separately and
  subtracted, since it is not the method's compute.
* **test image**: ``predict`` over ``--test`` images after their frozen features are cached
  (the queries come from the cache), per image, as a multiple of a plain frozen forward per
  image at the evaluation batch size.

The spec (``shared/specs/ptm-methods.md`` §6.2) expects a training step of ≈3F for L2P-style
methods (query pass + forward and backward through the frozen ViT to the prompts) and ≈2 passes
per test image when the query is recomputed; with the cached query it should be ≈1.

    python benchmarks/prompt_step_cost.py [--methods l2p dualprompt ...] [--size 224]

Uses a randomly initialised ViT-S/16 (timm ``vit_small_patch16_224``; weights do not change
timings) on MNIST-5k images. Writes benchmarks/results/prompt_step_cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from retain import ClassIncremental, create_dataset, create_method
from retain.backbones import INCEPTION_MEAN, INCEPTION_STD, Backbone
from retain.context import Context
from retain.datasets.base import DataBundle
from retain.methods import METHODS
from retain.transforms import Augment, Preprocess

PROMPT_METHODS = ["l2p", "dualprompt", "coda_prompt", "dap", "apg", "sprompts"]
SETTINGS = {"l2p": {}, "dualprompt": {}, "coda_prompt": {"num_tasks": 5}, "dap": {},
            "apg": {"warmup_epochs": 0}, "sprompts": {}}
EPOCHS = {"sprompts": "init_epochs"}  # the key that sets the first task's epochs


def small_vit(size: int) -> Backbone:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                                  img_size=size)
    pre = Preprocess(size, INCEPTION_MEAN, INCEPTION_STD, crop_pct=1.0, interpolation="bilinear")
    ident = {"name": f"vit_small_patch16_{size}_random", "sha256": f"random-vit-s16-{size}"}
    return Backbone(ident["name"], model.eval(), model.embed_dim, pre, ident)


def mnist(train_per_class: int, test_per_class: int) -> DataBundle:
    data = create_dataset("mnist5k").load()
    pick = [np.concatenate([np.flatnonzero(s.targets == c)[:n] for c in range(10)])
            for s, n in ((data.train, train_per_class), (data.test, test_per_class))]
    return DataBundle("mnist5k-small", data.train.subset(pick[0]), data.test.subset(pick[1]),
                      data.class_names)


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def plain_forward(backbone: Backbone, split, batch: int) -> float:
    x = backbone.preprocess(split, np.arange(batch))

    @torch.no_grad()
    def run():
        backbone.model(x)

    return timed(run)


def augment_time(backbone: Backbone, split, batch: int) -> float:
    x, g = backbone.preprocess(split, np.arange(batch)), torch.Generator().manual_seed(0)
    return timed(lambda: Augment()(x, g))


def measure(name: str, backbone: Backbone, bundle: DataBundle, batch: int, eval_batch: int,
            ref: dict) -> dict:
    scenario = ClassIncremental(bundle, increment=2, seed=1993)
    task = scenario[0]
    ctx = Context(batch_size=eval_batch)
    ctx.features(backbone, task.train)  # cached before timing (only non-augmented uses read it)
    ctx.features(backbone, task.test)
    steps = -(-len(task.train) // batch)
    seconds = {}
    for epochs in (1, 3):
        params = {"batch_size": batch, "augment": True} | SETTINGS.get(name, {})
        params[EPOCHS.get(name, "epochs")] = epochs
        method = create_method(name, backbone, **params)
        start = time.perf_counter()
        method.learn(task, ctx)
        seconds[epochs] = time.perf_counter() - start
    step = (seconds[3] - seconds[1]) / (2 * steps) - ref["augment"]
    extra = seconds[1] - steps * (step + ref["augment"])
    predict = timed(lambda: method.predict(task.test, ctx), repeats=2) / len(task.test)
    return {"method": name, "train_step_s": step, "train_step_F": step / ref["forward_batch"],
            "task_extra_s": extra,
            "test_image_s": predict, "test_image_F": predict / ref["forward_image"],
            "params": params, "uses_batch_information": method.uses_batch_information}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=PROMPT_METHODS)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--train", type=int, default=32, help="training images per class")
    parser.add_argument("--test", type=int, default=16, help="test images per class")
    parser.add_argument("--out", default="benchmarks/results/prompt_step_cost.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone, bundle = small_vit(args.size), mnist(args.train, args.test)
    ref = {"forward_batch": plain_forward(backbone, bundle.train, args.batch),
           "forward_image": plain_forward(backbone, bundle.test, args.eval_batch)
           / args.eval_batch,
           "augment": augment_time(backbone, bundle.train, args.batch)}
    print(f"plain frozen forward: {ref['forward_batch']:.3f} s per batch of {args.batch}, "
          f"{ref['forward_image'] * 1000:.1f} ms per test image; augmentation "
          f"{ref['augment']:.3f} s per batch")
    rows = []
    for name in args.methods:
        if name not in METHODS:
            print(f"{name}: not registered, skipped")
            continue
        row = measure(name, backbone, bundle, args.batch, args.eval_batch, ref)
        rows.append(row)
        print(f"{name:12s} train step {row['train_step_s']:.3f} s = {row['train_step_F']:.2f} F"
              f"   test image {row['test_image_s'] * 1000:.1f} ms = {row['test_image_F']:.2f} F")
    out = {"backbone": backbone.name, "image_size": args.size, "batch": args.batch,
           "eval_batch": args.eval_batch, "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "reference": ref,
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
