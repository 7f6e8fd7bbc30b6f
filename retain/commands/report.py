"""``retain report``: see retain/sweep/cli.py (Ray is imported only when runs start)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..sweep.cli import add_report_arguments

    add_report_arguments(p)


def main(args: argparse.Namespace) -> int:
    from ..sweep.cli import report_command

    report_command(args)
    return 0
