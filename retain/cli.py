"""The ``retain`` command: run, list, show (and sweep, report, reproduce from retain.sweep)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import RetainError

RUN_FLAGS = {  # flag -> (config key, type, help)
    "--method": ("method", str, "method name (retain list methods)"),
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retain", description="Continual learning, honestly measured.")
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="learn a stream and report its accuracy (default: offline demo)")
    for flag, (_, typ, text) in RUN_FLAGS.items():
        r.add_argument(flag, type=typ, help=text)
    r.add_argument("--preset", help="a shipped configuration (retain list presets)")
    r.add_argument("--config", help="YAML file of config keys")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, or a method hyper-parameter as params.NAME=VALUE")
    r.add_argument("--no-cache", action="store_true", help="keep frozen features in memory only")
    r.add_argument("--fresh", action="store_true", help="discard an earlier run in the folder")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    ls = sub.add_parser("list", help="list methods, datasets or backbones")
    ls.add_argument("what", choices=["methods", "datasets", "backbones", "presets"])
    sh = sub.add_parser("show", help="print the tables of a run folder again")
    sh.add_argument("run_dir")
    from .sweep.cli import add_parsers  # sweep, report, reproduce (light: imports on use)

    add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 0
    try:
        if args.command == "list":
            print(listing(args.what))
        elif args.command == "show":
            show(Path(args.run_dir))
        elif hasattr(args, "handler"):
            args.handler(args)
        else:
            run_command(args)
    except RetainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def run_command(args: argparse.Namespace) -> None:
    from .config import make_config
    from .runner import run

    flags = {key: getattr(args, flag[2:].replace("-", "_"))
             for flag, (key, _, _) in RUN_FLAGS.items()}
    if args.no_cache:
        flags["cache"] = False
    config = make_config(args.config, flags, args.set, preset=args.preset)
    run(config, fresh=args.fresh, progress=not args.quiet)


def show(run_dir: Path) -> None:
    from . import report
    from .errors import ConfigError
    from .io import read_json

    path = run_dir / "results.json"
    if not path.is_file():
        raise ConfigError(f"no results.json in {run_dir}; pass a folder written by `retain run`")
    print(report.table(read_json(path)))


def listing(what: str) -> str:
    import retain

    if what == "methods":
        return "\n".join(f"{n:<14} {c.paper}  [{', '.join(sorted(c.tags)) or '-'}]"
                         for n, c in ((n, retain.METHODS.get(n)) for n in retain.METHODS))
    if what == "presets":
        from .config import list_presets, preset_path, read_yaml

        return "\n".join(f"{n:<40} {read_yaml(preset_path(n)).get('description', '')}"
                         for n in list_presets())
    if what == "datasets":
        return "\n".join(f"{n:<16} {c.num_classes or '?':>4} classes  {c.description}"
                         for n, c in ((n, retain.DATASETS.get(n)) for n in retain.DATASETS))
    return "\n".join(f"{n:<44} {(f.__doc__ or '').strip().splitlines()[0] if f.__doc__ else ''}"
                     for n, f in ((n, retain.BACKBONES.get(n)) for n in retain.BACKBONES))


if __name__ == "__main__":  # python -m retain.cli
    sys.exit(main())
