"""The ``retain`` command. Each subcommand lives in its own module, imported only when it runs.

Adding a subcommand takes one line in ``COMMANDS``: ``(name, module, one-line help)``, where the
module defines

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...   # its flags
    def main(args: argparse.Namespace) -> int | None: ...              # 0/None: success

and keeps its own module top light (argparse, pathlib): heavy imports (torch, the runner)
belong inside ``main``. Only the module of the command being run is imported, so ``retain
--help`` and ``retain list`` answer at once whatever the other commands import.

Errors: a ``RetainError`` (bad input) prints one ``error:`` line and exits with 2; anything else
is a bug and keeps its traceback. ``--debug`` shows the traceback of input errors too.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import RetainError

COMMANDS: list[tuple[str, str, str]] = [
    ("run", "retain.commands.run",
     "learn a stream and report its accuracy (default: the offline demo)"),
    ("list", "retain.commands.listing",
     "list methods, datasets, backbones, presets, or a method's hyper-parameters"),
    ("info", "retain.commands.info",
     "a method's paper, tags, hyper-parameters, needs and presets"),
    ("show", "retain.commands.show", "print the tables of a run folder again"),
    ("verify", "retain.verify", "check a run folder, its checkpoints and cache entries"),
    ("predict", "retain.commands.predict",
     "classify images with a run folder's model (offline)"),
    ("serve", "retain.commands.serve", "serve a model over HTTP: predict, learn, versions"),
    ("sweep", "retain.commands.sweep",
     "run a grid of runs on Ray (resumable) and write its report"),
    ("report", "retain.commands.report", "report.md, report.html and results.csv of a sweep"),
    ("reproduce", "retain.commands.reproduce",
     "run a shipped reproduction sweep (retain reproduce --list)"),
]


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: ... (retain run --help)``, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with the arguments of the one subcommand named in ``argv`` (if any)."""
    p = Parser(prog="retain", description="Continual learning, honestly measured.")
    p.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, module, text in COMMANDS:
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks of input errors")
        if name == chosen:
            importlib.import_module(module).add_arguments(sp)
            sp.set_defaults(handler=module)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser(argv)
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 0
    try:
        return importlib.import_module(args.handler).main(args) or 0
    except RetainError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def __getattr__(name: str):
    if name == "RUN_FLAGS":  # the run flags, as before the commands had their own modules
        from .commands.run import RUN_FLAGS

        return RUN_FLAGS
    raise AttributeError(name)


if __name__ == "__main__":  # python -m retain.cli
    sys.exit(main())
