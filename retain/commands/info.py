"""``retain info METHOD``: what a method is, what it needs, its hyper-parameters and presets."""

from __future__ import annotations

import argparse
import textwrap


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("method", help="a method name (retain list methods)")


def main(args: argparse.Namespace) -> int:
    print(info(args.method))
    return 0


def info(name: str) -> str:
    from .. import catalog
    from ..config import list_presets, preset_path, read_yaml
    from ..preflight import known
    from .listing import DEFAULT_BACKBONE, params_table, preset_offline

    known(name, catalog.methods(), "method")
    m = catalog.methods()[name]
    runs = m["with_defaults_on"]
    ok = [b for b, why in runs.items() if why is None]
    lines = [f"{name}: {m['paper']}", *textwrap.wrap(m["summary"], 100),
             f"tags: {', '.join(m['tags']) or '-'}", "",
             f"with its defaults it runs on: {', '.join(ok) or 'none of the registered backbones'}"]
    if runs.get(DEFAULT_BACKBONE):
        lines.append(f"not on the default backbone: {runs[DEFAULT_BACKBONE]}")
    lines += ["", "hyper-parameters:", textwrap.indent(params_table(name), "  "), "", "presets:"]
    presets = [(n, read_yaml(preset_path(n))) for n in list_presets()]
    mine = [(n, cfg) for n, cfg in presets if cfg.get("method") == name]
    for n, cfg in mine:
        here, missing = preset_offline(cfg)
        lines.append(f"  {n:<40} {'runs offline' if here else 'needs ' + missing}")
    if not mine:
        lines.append("  (none)")
    return "\n".join(lines)
