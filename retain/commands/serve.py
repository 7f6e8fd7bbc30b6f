"""``retain serve``: see retain/serve/cli.py (fastapi and uvicorn are imported only to serve)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..serve.cli import add_serve_arguments

    add_serve_arguments(p)


def main(args: argparse.Namespace) -> int:
    from ..serve.cli import main as serve_main

    serve_main(args)
    return 0
