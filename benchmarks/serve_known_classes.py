"""Which methods learn from new images of classes they already know (retain serve's policy).

For every class-incremental method: learn task 0 of the tiny conformance stream (2 classes),
then a task that brings the same two classes again (their training images, no new class), and
report whether the method refuses it, ignores it (predictions unchanged) or learns it
(predictions changed). ``retain.serve.model.KNOWN_CLASS_METHODS`` lists the third group; the
server refuses known-class images for the others.

    PYTHONPATH=. python3 benchmarks/serve_known_classes.py [METHOD ...]

Writes benchmarks/results/serve_known_classes.json (all methods only).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from conftest import tiny_bundle  # noqa: E402
from test_conformance import FAST, STREAMS  # noqa: E402 (the one table of fast settings)

from retain.backbones import create_backbone  # noqa: E402
from retain.context import Context  # noqa: E402
from retain.features import FeatureCache  # noqa: E402
from retain.methods import METHODS, create_method  # noqa: E402
from retain.scenarios import ClassIncremental  # noqa: E402
from retain.scenarios.base import Task  # noqa: E402
from retain.serve.model import KNOWN_CLASS_METHODS  # noqa: E402


def behaviour(name: str) -> str:
    backbone, scenario = STREAMS.get(name, ("vit_tiny_random", "B0Inc2"))
    if scenario.startswith("TIL"):
        return "not served (needs task ids)"
    size = 16 if backbone == "vit_tiny_random" else None
    first = ClassIncremental(tiny_bundle(), increment=2, seed=1993)[0]
    ctx = Context(batch_size=16, seed=1993, cache=FeatureCache())
    method = create_method(name, create_backbone(backbone, image_size=size), **FAST.get(name, {}))
    method.learn(first, ctx)
    before = method.predict(first.test, ctx).clone()
    again = Task(id=1, classes=first.classes, new_classes=(), seen_classes=first.seen_classes,
                 train=first.train, test=first.test, kind="class", class_names=first.class_names)
    try:
        method.learn(again, ctx)
    except ValueError as e:
        return f"refuses: {str(e)[:70]}"
    changed = not torch.allclose(before, method.predict(first.test, ctx))
    return "learns" if changed else "ignores"


def main() -> None:
    names = sys.argv[1:] or METHODS.names()
    table = {}
    for name in names:
        t0 = time.perf_counter()
        b = behaviour(name)
        listed = name in KNOWN_CLASS_METHODS
        agree = listed == (b == "learns")
        table[name] = {"behaviour": b, "listed": listed, "agrees": agree}
        print(f"{name:14s} {b:80s} listed={listed!s:5s} {'ok' if agree else 'MISMATCH'} "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)
    if not sys.argv[1:]:
        out = Path(__file__).parent / "results" / "serve_known_classes.json"
        out.write_text(json.dumps(table, indent=2))
        print(f"written {out}")


if __name__ == "__main__":
    main()
