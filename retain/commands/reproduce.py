"""``retain reproduce``: see retain/sweep/cli.py (Ray is imported only when runs start)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..sweep.cli import add_reproduce_arguments

    add_reproduce_arguments(p)


def main(args: argparse.Namespace) -> int:
    from ..sweep.cli import reproduce_command

    reproduce_command(args)
    return 0
