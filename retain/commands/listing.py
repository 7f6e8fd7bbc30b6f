"""``retain list``: methods, datasets, backbones, presets (marked where they run offline), or
the hyper-parameters of one method. Reads ``retain.catalog``: no torch."""

from __future__ import annotations

import argparse

WHAT = ("methods", "datasets", "backbones", "presets", "params")
DEFAULT_BACKBONE = "efficientnet_lite0"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=WHAT, help="what to list; params needs a method name")
    p.add_argument("name", nargs="?", help="the method, for `retain list params METHOD`")


def main(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    if args.what == "params":
        if not args.name:
            raise ConfigError("retain list params needs a method name: retain list params "
                              "METHOD (retain list methods)")
        print(params_table(args.name))
    else:
        print({"methods": methods, "datasets": datasets, "backbones": backbones,
               "presets": presets}[args.what]())
    return 0


def methods() -> str:
    from .. import catalog

    rows = []
    for name, m in catalog.methods().items():
        mark = "*" if m["with_defaults_on"].get(DEFAULT_BACKBONE) is None else " "
        rows.append(f"{name:<13}{mark} {m['paper']}  [{', '.join(m['tags']) or '-'}]")
    return "\n".join(rows + ["", f"* runs with its defaults on the default backbone "
                                 f"({DEFAULT_BACKBONE}); `retain info NAME` says what the others "
                                 "need and lists the hyper-parameters"])


def datasets() -> str:
    from .. import catalog
    from ..datasets import create_dataset

    return "\n".join(f"{n:<16} {d['classes'] or '?':>4} classes  "
                     f"{'offline ' if create_dataset(n).available() else '        '}{d['summary']}"
                     for n, d in catalog.datasets().items())


def backbones() -> str:
    from .. import catalog
    from ..specs import BackboneSpec

    rows = []
    for n, b in catalog.backbones().items():
        spec = BackboneSpec(**b["spec"]) if b["spec"] else None
        where = "offline" if spec is None or spec.offline() else "needs weights"
        rows.append(f"{n:<44} {spec.kind if spec else '?':<6} {where:<13} {b['summary']}")
    return "\n".join(rows + ["", "and any pretrained timm model name (weights from the "
                                 "HuggingFace hub or --weights FILE)"])


def presets() -> str:
    from ..config import list_presets, preset_path, read_yaml

    rows = []
    for n in list_presets():
        cfg = read_yaml(preset_path(n))
        ok, _ = preset_offline(cfg)
        text = " ".join(str(cfg.get("description", "")).split())
        text = text if len(text) <= 90 else text[:89] + "…"
        rows.append(f"{n:<40} {'offline' if ok else '       '}  {text}")
    return "\n".join(rows + ["", "offline: its dataset and backbone weights are on this machine "
                                 "(no --data-root, no download)"])


def preset_offline(cfg: dict) -> tuple[bool, str]:
    """Whether a preset's dataset and backbone weights are here; else what is missing."""
    from .. import catalog
    from ..datasets import create_dataset
    from ..specs import BackboneSpec, weights_present

    missing = []
    dataset, backbone = cfg.get("dataset", "mnist5k"), cfg.get("backbone", DEFAULT_BACKBONE)
    if dataset not in catalog.datasets() or not create_dataset(dataset).available():
        missing.append(f"the {dataset} data (--data-root)")
    entry = catalog.backbones().get(backbone)
    present = (BackboneSpec(**entry["spec"]).offline() if entry and entry["spec"] else
               weights_present(f"hub:timm/{backbone}/model.safetensors"))
    if not present:
        missing.append(f"the {backbone} weights")
    return not missing, " and ".join(missing)


def params_table(method: str) -> str:
    """The hyper-parameters of ``method``: name, type, default, range and meaning."""
    from .. import catalog
    from .. import params as P
    from ..preflight import known

    known(method, catalog.methods(), "method")
    entries = catalog.methods()[method]["params"]
    if not entries:
        return f"{method} has no hyper-parameters"
    rows = [("name", "type", "default", "range", "meaning")]
    for p in entries:
        rng = str(P.Interval(*p["range"])) if p["range"] else ""
        rows.append((p["name"], P.describe_type(P.annotation(p["type"])), _value(p["default"]),
                     rng, p["help"]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  "
                     + r[4] for r in rows).rstrip() + \
        f"\n\nset them with --set params.NAME=VALUE (e.g. --set params.{entries[0]['name']}=...)"


def _value(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return repr(v) if isinstance(v, str) else str(v)
