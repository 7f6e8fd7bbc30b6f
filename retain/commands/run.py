"""``retain run``: learn a stream and report its accuracy."""

from __future__ import annotations

import argparse
import os

RUN_FLAGS = {  # flag -> (config key, type, help)
    "--method": ("method", str, "method name (retain list methods; retain info NAME)"),
    "--dataset": ("dataset", str, "dataset name (retain list datasets)"),
    "--data-root": ("data_root", str, "folder holding the dataset"),
    "--scenario": ("scenario", str, "B{m}Inc{n} (e.g. B0Inc10), TIL-B{m}Inc{n}, "
                   "Superclass-CIL|TIL, Permuted{n}, Rotated{n}, Domains, "
                   "TaskFree{k}:{any of these}"),
    "--task-order": ("task_order", str, "A-E (APD's official orders) or task indices '2,0,1'"),
    "--backbone": ("backbone", str, "backbone name (retain list backbones)"),
    "--weights": ("weights", str, "local weights file (.safetensors, .npz, .pth; CLIP: .bin, "
                  "OpenAI .pt)"),
    "--image-size": ("image_size", int, "input resolution (default: the backbone's)"),
    "--seed": ("seed", int, "seed of the class order and every random draw (default 1993)"),
    "--out": ("out", str, "run folder (default runs/<method>-<dataset>-<scenario>-s<seed>)"),
    "--device": ("device", str, "auto, cpu, cuda, cuda:N, mps"),
    "--batch-size": ("batch_size", int, "batch size of frozen passes and evaluation"),
    "--autocast": ("autocast", str, "none or bf16 (frozen passes)"),
    "--cache-dir": ("cache_dir", str, "feature cache folder"),
    "--keep-checkpoints": ("keep_checkpoints", str, "last or all"),
}


def add_arguments(r: argparse.ArgumentParser) -> None:
    for flag, (_, typ, text) in RUN_FLAGS.items():
        r.add_argument(flag, type=typ, help=text)
    r.add_argument("--preset", help="a shipped configuration (retain list presets)")
    r.add_argument("--config", help="YAML file of config keys")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (subset.train=300: 300 training images per "
                   "class), or a method hyper-parameter as params.NAME=VALUE")
    r.add_argument("--no-cache", action="store_true", help="keep frozen features in memory only")
    r.add_argument("--fresh", action="store_true", help="discard an earlier run in the folder")
    r.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    from .. import preflight
    from ..config import make_config

    flags = {key: getattr(args, flag[2:].replace("-", "_"))
             for flag, (key, _, _) in RUN_FLAGS.items()}
    if args.no_cache:
        flags["cache"] = False
    config = make_config(args.config, flags, args.set, preset=args.preset)
    preflight.check_inputs(config, fresh=args.fresh)  # milliseconds: before torch loads
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone speaks
        print(preflight.summary(config), flush=True)
    from ..runner import run

    run(config, fresh=args.fresh, progress=not args.quiet)
    return 0
