"""The grid of a sweep: a YAML file (or command-line flags) expanded into ordinary run configs.

A sweep file::

    description: free text
    seeds: [1993, 1994, 1995]             # axes, crossed with every entry
    datasets: [mnist5k, fashion_mnist]
    scenarios: [B0Inc2]
    backbones: [efficientnet_lite0]
    config: {image_size: 64}              # config keys for every entry
    grid: {params.lr: [0.01, 0.1]}        # more axes: config keys or params.NAME -> values
    unavailable: fail                     # or skip: leave out points whose data/weights are absent
    methods:
      - simplecil                         # a method name ...
      - {method: ranpac, params: {peft: none}}
      - {preset: ease_cifar100_b0inc10}   # ... or a shipped preset
      - {name: aper-ft, method: aper, params: {peft: finetune}, backbones: [efficientnet_lite0]}

Precedence, lowest first: RunConfig defaults < the entry's preset < ``config`` < the entry's own
keys (its ``params`` merged key by key) < axis and grid values < ``--set`` (every entry). An
entry may narrow an axis (``datasets: [...]``) or fix it (``dataset: x``); a preset's dataset,
scenario and seed stand unless an axis names them. Every point is validated as ``retain run``
validates one config (unknown keys, methods, datasets, backbones, scenarios and
hyper-parameters), and the error names the entry, before anything starts.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import RunConfig, make_config, merge, read_yaml
from ..errors import ConfigError

AXES = {"seeds": "seed", "datasets": "dataset", "scenarios": "scenario", "backbones": "backbone"}
TOP_KEYS = {"description", "methods", "config", "grid", "unavailable", *AXES}
CONFIG_KEYS = {f.name for f in fields(RunConfig)}
ENTRY_KEYS = {"method", "preset", "name", "grid", *AXES} | CONFIG_KEYS
SET_BY_SWEEP = {"out"}  # the sweep chooses each run's folder


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its folder name, its label in the report and its validated config."""

    name: str  # folder under <sweep>/runs/
    label: str  # the entry's name, preset or method
    group: str  # the name without the seed: seeds of one setting share it
    entry: int  # position of the entry in the sweep file (1-based)
    config: RunConfig
    grid: dict[str, Any] = field(default_factory=dict)  # this point's grid values

    def record(self) -> dict:
        return {"name": self.name, "label": self.label, "group": self.group, "entry": self.entry,
                "grid": self.grid, "config": self.config.to_dict()}


def read_sweep_file(path: str | Path) -> dict:
    """The mapping of a sweep file (top-level keys checked)."""
    spec = read_yaml(path)
    check_keys(spec, TOP_KEYS, f"sweep file {path}")
    if not spec.get("methods"):
        raise ConfigError(f"sweep file {path} lists no methods; add `methods: [simplecil, ...]`")
    return spec


def spec_from_flags(methods: str | None, datasets: str | None = None,
                    scenarios: str | None = None, seeds: str | None = None,
                    backbones: str | None = None) -> dict:
    """A sweep spec from comma-separated flags (``--methods a,b --seeds 1993,1994``)."""
    if not methods:
        raise ConfigError("a sweep needs a sweep file or --methods a,b,...")

    def items(text):
        return [t.strip() for t in text.split(",") if t.strip()]

    spec: dict[str, Any] = {"methods": items(methods)}
    for key, text in (("datasets", datasets), ("scenarios", scenarios), ("backbones", backbones)):
        if text:
            spec[key] = items(text)
    if seeds:
        try:
            spec["seeds"] = [int(s) for s in items(seeds)]
        except ValueError as e:
            raise ConfigError(f"--seeds expects integers separated by commas, got {seeds!r}") \
                from e
    return spec


def expand(spec: dict, sweep_dir: str | Path, sets: list[str] | None = None,
           where: str = "sweep") -> list[Point]:
    """Every point of ``spec``, validated; run folders under ``sweep_dir/runs``."""
    check_keys(spec, TOP_KEYS, where)
    for item in sets or []:
        if item.split("=", 1)[0].strip() in SET_BY_SWEEP:
            raise ConfigError(f"--set {item}: the sweep chooses each run's folder; pass --out "
                              "for the sweep folder instead")
    entries = spec.get("methods") or []
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: `methods` must be a list of method names or mappings")
    points = []
    for i, entry in enumerate(entries, 1):
        points += expand_entry(spec, normalise(entry, i, where), i, Path(sweep_dir), sets or [],
                               where)
    check_unique(points, where)
    validate_points(points, where)
    return points


def normalise(entry: Any, i: int, where: str) -> dict:
    if isinstance(entry, str):
        entry = {"method": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}, entry {i}: expected a method name or a mapping, "
                          f"got {entry!r}")
    label = entry.get("name") or entry.get("preset") or entry.get("method") or "?"
    check_keys(entry, ENTRY_KEYS, f"{where}, entry {i} ({label})")
    if ("method" in entry) == ("preset" in entry):
        raise ConfigError(f"{where}, entry {i} ({label}): give exactly one of `method` "
                          "or `preset`")
    return entry


def expand_entry(spec: dict, entry: dict, i: int, sweep_dir: Path, sets: list[str],
                 where: str) -> list[Point]:
    label = str(entry.get("name") or entry.get("preset") or entry["method"])
    here = f"{where}, entry {i} ({label})"
    base = merge(dict(spec.get("config") or {}), scalars(entry))
    axes = {key: axis_values(spec, entry, plural, key, here) for plural, key in AXES.items()}
    grid = {**mapping(spec.get("grid"), f"{where}: grid"), **mapping(entry.get("grid"),
                                                                    f"{here}: grid")}
    keys = [*axes, *grid]
    points = []
    for combo in itertools.product(*axes.values(), *grid.values()):
        values = dict(base)
        for key, value in zip(keys, combo, strict=True):
            put(values, key, value)
        chosen = {k: v for k, v in zip(keys[len(axes):], combo[len(axes):], strict=True)}
        config = config_for(values, entry.get("preset"), sets, here)
        name = run_name(label, config, chosen)
        values["out"] = str(sweep_dir / "runs" / name)
        config = config_for(values, entry.get("preset"), sets, here)
        points.append(Point(name, label, name.rsplit("-s", 1)[0], i, config, chosen))
    return points


def scalars(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k in CONFIG_KEYS}


def axis_values(spec: dict, entry: dict, plural: str, key: str, where: str) -> list:
    """The values of one axis for an entry: its own list, its own fixed value, the sweep's
    list, or [None] (the preset's or the default value)."""
    if plural in entry:
        values = entry[plural]
    elif key in entry:
        return [None]  # fixed by the entry's own key, already in its base values
    else:
        values = spec.get(plural)
        if values is None:
            return [None]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: `{plural}` must be a non-empty list, got {values!r}")
    return values


def mapping(value: Any, where: str) -> dict[str, list]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, list) and v for v in value.values()):
        raise ConfigError(f"{where} must map config keys (or params.NAME) to non-empty lists")
    for key in value:
        if not key.startswith("params.") and key not in CONFIG_KEYS - SET_BY_SWEEP:
            raise ConfigError(f"{where}: unknown key {key!r}; valid: config keys or params.NAME")
    return dict(value)


def put(values: dict, key: str, value: Any) -> None:
    if value is None:
        return
    if key.startswith("params."):
        values["params"] = dict(values.get("params") or {}) | {key[7:]: value}
    else:
        values[key] = value


def config_for(values: dict, preset: str | None, sets: list[str], where: str) -> RunConfig:
    try:
        return make_config(flags=values, sets=sets, preset=preset)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    except TypeError as e:  # e.g. a mapping where a scalar belongs
        raise ConfigError(f"{where}: {e}") from e


def run_name(label: str, config: RunConfig, grid: dict) -> str:
    """<label>-<dataset>-<scenario>-<backbone>[-<key>=<value>...]-s<seed>, filesystem-safe."""
    order = f"-order{config.task_order}" if config.task_order else ""
    extra = "".join(f"-{k.removeprefix('params.')}={v}" for k, v in sorted(grid.items())
                    if k not in ("seed",))
    name = (f"{label}-{config.dataset}-{config.scenario}{order}-{config.backbone}{extra}"
            f"-s{config.seed}")
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


def check_keys(mapping_: dict, valid: set[str], where: str) -> None:
    if not isinstance(mapping_, dict):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = sorted(set(mapping_) - valid)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(sorted(valid))}")


def check_unique(points: list[Point], where: str) -> None:
    seen: dict[str, Point] = {}
    for p in points:
        if p.name in seen:
            raise ConfigError(f"{where}: entries {seen[p.name].entry} and {p.entry} both give "
                              f"the run {p.name}; give one of them a `name:`")
        seen[p.name] = p


# ------------------------------------------------------------------------------- validation


def validate_points(points: list[Point], where: str) -> None:
    """What ``retain run`` would refuse, refused now: methods, hyper-parameters, datasets,
    backbones and scenario names (data and weights are checked by ``preflight``)."""
    from .. import params as P
    from ..datasets import DATASETS
    from ..methods import METHODS

    backbones_ok: set[str] = set()
    for p in points:
        here = f"{where}, entry {p.entry} ({p.label})"
        try:
            P.validate(METHODS.get(p.config.method), p.config.params, what=p.config.method)
            DATASETS.get(p.config.dataset)
            check_scenario(p.config.scenario)
            if p.config.backbone not in backbones_ok:
                check_backbone(p.config.backbone)
                backbones_ok.add(p.config.backbone)
        except ConfigError as e:
            raise ConfigError(f"{here}: {e}") from e


def check_scenario(name: str) -> None:
    """The scenario names of ``retain.scenarios.factory``, checked without data."""
    from ..scenarios import parse_notation
    from ..scenarios.factory import FORMS

    if m := re.fullmatch(r"TaskFree(\d*):(.+)", name):
        return check_scenario(m.group(2))
    if name.startswith("TIL-"):
        parse_notation(name[4:])
    elif name in ("Superclass-CIL", "Superclass-TIL") or name == "Domains" \
            or name.startswith("Domains:") or re.fullmatch(r"(Permuted|Rotated)\d+", name):
        return
    elif name.startswith("B"):
        parse_notation(name)
    else:
        raise ConfigError(f"unknown scenario {name!r}; use one of: {FORMS}")


def check_backbone(name: str) -> None:
    from ..backbones import BACKBONES

    if name in BACKBONES:
        return
    import timm

    if timm.is_model(name.split(".")[0]) and name in timm.list_models(pretrained=True):
        return
    raise ConfigError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES.names())}"
                      " or any pretrained timm model name")
