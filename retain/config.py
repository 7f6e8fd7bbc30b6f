"""The run configuration: typed, validated in one place, written next to every result.

Precedence: defaults < ``--preset NAME`` < ``--config file.yaml`` < explicit command-line flags
< ``--set key=value``. Presets are YAML files shipped in ``retain/presets/`` that reproduce a
published configuration (method, hyper-parameters, dataset, scenario, backbone).
Method hyper-parameters live under ``params`` (``--set params.lr=0.01``) and are validated
against the method's signature when the run starts. ``preprocess`` overrides the backbone's
declared image transform (``--set preprocess.crop_pct=1.0``; keys mean, std, crop_pct,
interpolation; see ``retain.transforms``), e.g. to match a reference implementation's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from . import params as P
from .errors import ConfigError


@dataclass(kw_only=True)
class RunConfig:
    method: str = "simplecil"  # a name from `retain list methods`
    params: dict[str, Any] = field(default_factory=dict)  # the method's hyper-parameters
    dataset: str = "mnist5k"  # a name from `retain list datasets`
    data_root: str | None = None  # folder holding the dataset (real benchmarks)
    scenario: str = "B0Inc2"  # B{m}Inc{n}, TIL-B{m}Inc{n}, Superclass-CIL/-TIL, Permuted{n}, ...
    task_order: str | None = None  # A-E (APD's official orders) or "2,0,1,..."; None: as built
    backbone: str = "efficientnet_lite0"  # a name from `retain list backbones`
    weights: str | None = None  # local weights file instead of the backbone's default source
    image_size: int | None = None  # input resolution; None: the backbone's own
    preprocess: dict[str, Any] = field(default_factory=dict)  # transform overrides (mean, ...)
    seed: int = 1993  # class order and every random draw
    out: str | None = None  # run folder; None: runs/<method>-<dataset>-<scenario>-s<seed>
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    batch_size: int | None = None  # frozen passes and evaluation; None: 16 on CPU, 128 on GPU
    autocast: Literal["none", "bf16"] = "none"  # bf16 autocast for frozen backbone passes
    cache_dir: str | None = None  # feature cache folder; None: ~/.cache/retain/features
    cache: bool = True  # keep frozen features on disk across runs
    keep_checkpoints: Literal["last", "all"] = "last"  # per-task checkpoints to keep
    description: str = ""  # free text; presets say what they reproduce

    constraints = {"seed": P.Interval(0, 2**32 - 1), "batch_size": P.Interval(1, None),
                   "image_size": P.Interval(8, 4096)}

    @property
    def run_dir(self) -> Path:
        order = f"-order{self.task_order.replace(',', '.')}" if self.task_order else ""
        return Path(self.out or f"runs/{self.method}-{self.dataset}-{self.scenario}{order}"
                    f"-s{self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# keys whose change does not change the results (a resumed run may differ in them)
VOLATILE = {"out", "device", "batch_size", "cache_dir", "cache", "keep_checkpoints",
            "description"}


PRESETS = Path(__file__).parent / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
    return path


def make_config(file: str | Path | None = None, flags: dict[str, Any] | None = None,
                sets: list[str] | None = None, preset: str | None = None) -> RunConfig:
    """A validated RunConfig from a preset, a YAML file, explicit flags and ``key=value``."""
    values: dict[str, Any] = {}
    if preset is not None:
        values |= read_yaml(preset_path(preset))
    if file is not None:
        values = merge(values, read_yaml(file))
    values = merge(values, {k: v for k, v in (flags or {}).items() if v is not None})
    for item in sets or []:
        apply_set(values, item)
    config = RunConfig(**P.validate(RunConfig, values, what="config"))
    from .transforms import overrides  # imports torch: only when a run is configured

    checked = overrides(config.preprocess)  # lists, not tuples: the config round-trips JSON
    config.preprocess = {k: list(v) if isinstance(v, tuple) else v for k, v in checked.items()}
    return config


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; method ``params`` and ``preprocess`` are merged key by key."""
    out = base | top
    for key in ("params", "preprocess"):
        if isinstance(base.get(key), dict) and isinstance(top.get(key), dict):
            out[key] = base[key] | top[key]
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not {type(data).__name__}")
    return data


def apply_set(values: dict[str, Any], item: str) -> None:
    """'key=value', 'params.key=value' or 'preprocess.key=value' into ``values`` (values parsed
    later, by type)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, value = item.split("=", 1)
    key = key.strip()
    if key.startswith("params."):
        values["params"] = dict(values.get("params") or {}) | {key[7:]: value}
        return
    if key.startswith("preprocess."):
        parsed = yaml.safe_load(value) if value.strip() else value  # '[0, 0, 0]', '1.0'
        values["preprocess"] = dict(values.get("preprocess") or {}) | {key[11:]: parsed}
        return
    valid = [f.name for f in fields(RunConfig)]
    if key not in valid:
        raise ConfigError(f"unknown config key {key!r}; valid: {', '.join(valid)} "
                          "(method hyper-parameters: params.NAME)")
    values[key] = None if value.strip().lower() in ("null", "none", "~") else value


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that determines the results."""
    return {k: v for k, v in config.items() if k not in VOLATILE}
