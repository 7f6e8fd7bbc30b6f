"""The ``retain sweep``, ``retain report`` and ``retain reproduce`` subcommands.

``add_{sweep,report,reproduce}_arguments(parser)`` give their flags (hooked in by
retain/commands/); ``*_command(args)`` run them. Nothing heavy is imported until a command runs
(Ray only when runs start).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from ..errors import RetainError

SWEEPS = Path(__file__).parent.parent / "sweeps"  # shipped sweep files (retain reproduce)


class SweepFailed(RetainError):
    """Some runs of a sweep failed (the others finished; the report lists the failures)."""


def add_sweep_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("file", nargs="?", help="sweep file (YAML); or give --methods etc.")
    s.add_argument("--methods", help="comma-separated method names (without a sweep file)")
    s.add_argument("--datasets", help="comma-separated dataset names")
    s.add_argument("--scenarios", help="comma-separated scenarios, e.g. B0Inc2,B0Inc5")
    s.add_argument("--backbones", help="comma-separated backbone names")
    s.add_argument("--seeds", help="comma-separated seeds, e.g. 1993,1994,1995")
    engine_options(s)


def add_report_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("sweep_dir", help="a sweep folder (or any folder of run folders)")
    r.add_argument("run_dirs", nargs="*", help="more run folders to include")
    r.add_argument("--report-dir", help="where to write the report (default: SWEEP_DIR)")


def add_reproduce_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="a shipped sweep (retain reproduce --list)")
    p.add_argument("--list", action="store_true", help="list the shipped sweeps")
    engine_options(p)


def engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (or params.NAME) in every run")
    p.add_argument("--data-root", help="folder holding the datasets (every run)")
    p.add_argument("--cache-dir", help="feature cache shared by every run (on a cluster: a "
                   "path every node sees)")
    p.add_argument("--out", help="sweep folder (default sweeps/<name>)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local "
                   "Ray started here)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--max-concurrent", type=int, help="runs at once (default: one per GPU, "
                   "else half the CPUs)")
    p.add_argument("--no-warm", action="store_true", help="no cache warm-up before the runs")
    p.add_argument("--skip-unavailable", action="store_true", help="leave out runs whose data "
                   "or weights are missing instead of refusing the sweep")
    p.add_argument("--report-dir", help="where to write the report (default: the sweep folder)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and stop")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def sweep_command(args: argparse.Namespace) -> None:
    from .grid import read_sweep_file, spec_from_flags

    if args.file:
        if args.methods:
            from ..errors import ConfigError

            raise ConfigError("give a sweep file or --methods, not both")
        spec = read_sweep_file(args.file)
        name, source = Path(args.file).stem, str(args.file)
    else:
        spec = spec_from_flags(args.methods, args.datasets, args.scenarios, args.seeds,
                               args.backbones)
        name, source = "sweep", "flags"
    launch(spec, name, source, args)


def reproduce_command(args: argparse.Namespace) -> None:
    from .grid import read_sweep_file

    if args.list or not args.name:
        print(listing())
        return
    path = SWEEPS / f"{args.name}.yaml"
    if not path.is_file():
        from ..errors import ConfigError

        raise ConfigError(f"unknown reproduction {args.name!r}; choose one of: "
                          f"{', '.join(shipped())} (retain reproduce --list)")
    launch(read_sweep_file(path), args.name, f"retain/sweeps/{path.name}", args)


def shipped() -> list[str]:
    return sorted(p.stem for p in SWEEPS.glob("*.yaml"))


def listing() -> str:
    from ..config import read_yaml

    lines = []
    for name in shipped():
        text = str(read_yaml(SWEEPS / f"{name}.yaml").get("description", ""))
        lines.append(f"{name:<24} {textwrap.shorten(text, 110, placeholder=' ...')}")
    return "\n".join(lines)


def launch(spec: dict, name: str, source: str, args: argparse.Namespace) -> None:
    from .engine import run_sweep
    from .grid import expand
    from .report import write_report

    out = Path(args.out or f"sweeps/{name}")
    sets = list(args.set)
    sets += [f"data_root={args.data_root}"] if args.data_root else []
    sets += [f"cache_dir={args.cache_dir}"] if args.cache_dir else []
    points = expand(spec, out, sets, where=source)
    if args.dry_run:
        for p in points:
            print(f"{p.name}  (entry {p.entry})")
        print(f"{len(points)} runs in {out}")
        return
    unavailable = "skip" if args.skip_unavailable else spec.get("unavailable", "fail")
    counts = run_sweep(points, out, address=args.address, num_cpus=args.num_cpus,
                       max_concurrent=args.max_concurrent, warm=not args.no_warm,
                       unavailable=unavailable, description=spec.get("description", ""),
                       source=source, progress=not args.quiet)
    paths = write_report(out, out_dir=args.report_dir)
    print(f"report: {paths['md']}, {paths['html']}, {paths['csv']}")
    if counts["failed"]:
        raise SweepFailed(f"{counts['failed']} of {counts['total']} runs failed (listed in "
                          f"{paths['md']}); the others are done. Fix the cause and run the same "
                          "command again: finished runs are skipped")


def report_command(args: argparse.Namespace) -> None:
    from .report import write_report

    paths = write_report(args.sweep_dir, args.run_dirs, args.report_dir)
    print(f"report: {paths['md']}, {paths['html']}, {paths['csv']}")
