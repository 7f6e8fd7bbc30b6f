"""``retain show RUN_DIR``: the tables of a finished (or unfinished) run, from its results.json."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a folder written by `retain run`")


def main(args: argparse.Namespace) -> int:
    from .. import report
    from ..errors import ConfigError
    from ..preflight import read_results
    from ..verify import trusted_results

    run_dir = Path(args.run_dir)
    path = run_dir / "results.json"
    if not path.is_file():
        raise ConfigError(f"no results.json in {run_dir}; pass a folder written by `retain run`")
    read_results(path, fix="run the same `retain run` again to resume it")  # shape, one line
    results, notes = trusted_results(run_dir)  # counts validated, checked against checkpoints
    print("\n".join([report.table(results), *notes]))
    return 0
