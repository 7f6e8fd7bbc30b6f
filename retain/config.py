"""The run configuration: typed, validated in one place, written next to every result.

Precedence: defaults < ``--preset NAME`` < ``--config file.yaml`` < explicit command-line flags
< ``--set key=value``. Presets are YAML files shipped in ``retain/presets/`` that reproduce a
published configuration (method, hyper-parameters, dataset, scenario, backbone).
Method hyper-parameters live under ``params`` (``--set params.lr=0.01``) and are validated
against the method's signature when the run starts. ``subset`` draws a per-class subset of the
dataset for quick experiments (``--set subset.train=300``). ``preprocess`` overrides the
backbone's declared image transform (``--set preprocess.crop_pct=1.0``; keys mean, std,
crop_pct, interpolation; see ``retain.transforms``), e.g. to match a reference implementation's.
A misspelt key is an error that names the closest valid keys, in the same words whether it came
from a file or from ``--set``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from . import params as P
from .errors import ConfigError

NESTED = ("params", "subset", "preprocess")  # config keys that hold a mapping, merged key by key
PREPROCESS_KEYS = ("mean", "std", "crop_pct", "interpolation")  # = transforms.OVERRIDABLE


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
    # per-class subset {"train": n, "test": m}: n training / m test images of each class, drawn
    # with the run seed (positions stay those of the full split, so cached features are reused)
    subset: dict[str, int] = field(default_factory=dict)
    description: str = ""  # free text; presets say what they reproduce

    constraints = {"seed": P.Interval(0, 2**32 - 1), "batch_size": P.Interval(1, None),
                   "image_size": P.Interval(8, 4096)}
    subset_keys = ("train", "test")

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
        raise ConfigError(P.unknown_message("preset", name, list_presets(),
                                            otherwise=" (retain list presets)"))
    return path


def make_config(file: str | Path | None = None, flags: dict[str, Any] | None = None,
                sets: list[str] | None = None, preset: str | None = None) -> RunConfig:
    """A validated RunConfig from a preset, a YAML file, explicit flags and ``key=value``."""
    values: dict[str, Any] = {}
    if preset is not None:
        values = merge(values, checked_keys(read_yaml(preset_path(preset)), f"preset {preset}"))
    if file is not None:
        values = merge(values, checked_keys(read_yaml(file), str(file)))
    values = merge(values, {k: v for k, v in (flags or {}).items() if v is not None})
    for item in sets or []:
        apply_set(values, item)
    table = P.specs(RunConfig)
    out = P.check(table, RunConfig.constraints, values, "config", kind="config key")
    out["subset"] = checked_subset(out.get("subset", {}))
    config = RunConfig(**out)
    if config.preprocess:  # transforms imports torch: only when there is something to check
        from .transforms import overrides

        checked = overrides(config.preprocess)  # lists, not tuples: the config round-trips JSON
        config.preprocess = {k: list(v) if isinstance(v, tuple) else v
                             for k, v in checked.items()}
    return config


def config_keys() -> list[str]:
    """Every valid key, ``subset.train``-style for nested ones (what "did you mean" draws on)."""
    keys = [f.name for f in fields(RunConfig) if f.name not in ("subset", "preprocess")]
    return (keys + [f"subset.{k}" for k in RunConfig.subset_keys]
            + [f"preprocess.{k}" for k in PREPROCESS_KEYS])


def checked_keys(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` unchanged, or a ConfigError naming the first misspelt key and its neighbours."""
    top = {f.name for f in fields(RunConfig)}
    for key, value in data.items():
        if key not in top:
            raise ConfigError(unknown_key(str(key), source))
        for group, valid in (("subset", RunConfig.subset_keys), ("preprocess", PREPROCESS_KEYS)):
            if key == group and isinstance(value, dict):
                for k in value:
                    if k not in valid:
                        raise ConfigError(unknown_key(f"{group}.{k}", source))
    return data


def unknown_key(key: str, source: str) -> str:
    return P.unknown_message("config key", key, config_keys(), f"in {source}",
                             " (a method's hyper-parameters go under params: params.NAME)")


def checked_subset(subset: dict[str, Any]) -> dict[str, int]:
    """{"train": n, "test": m} with positive integer counts (either may be left out)."""
    out = {}
    for key, value in subset.items():
        n = P.coerce(value, int, f"config.subset.{key}")
        if n < 1:
            raise ConfigError(f"config.subset.{key} = {n}: give at least 1 image per class, or "
                              "leave subset out to use every image")
        out[str(key)] = n
    return out


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; ``params``, ``subset`` and ``preprocess`` are merged key by key."""
    out = base | top
    for key in NESTED:
        if isinstance(base.get(key), dict) and isinstance(top.get(key), dict):
            out[key] = base[key] | top[key]
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file; a ConfigError (one line) for anything else."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise ConfigError(f"config file {path} {what}; pass a YAML file of config keys")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a text file (byte {e.start} is not UTF-8); pass a "
                          "YAML file of config keys") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(f"{path}{_where(e)}: {e.problem}; config files hold plain values "
                          "(numbers, strings, lists, mappings), no tags") from None
    except (yaml.YAMLError, RecursionError) as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{_where(e)} is not valid YAML: {problem}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not {type(data).__name__}")
    return data


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C reader where libyaml is present


def _where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def preprocess_value(key: str, text: str) -> Any:
    """A ``--set preprocess.KEY=VALUE`` value read as YAML ('[0.5, 0.5, 0.5]', '1.0', 'bicubic')."""
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}={text}: not a value (give a number, a list such as "
                          "[0.5, 0.5, 0.5], or a name)") from None


def apply_set(values: dict[str, Any], item: str) -> None:
    """'key=value', 'params.key=value', 'subset.train=n' or 'preprocess.key=value' into
    ``values`` (values are parsed
    later, by type)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, value = item.split("=", 1)
    key = key.strip()
    for group in ("params", "subset", "preprocess"):
        if key.startswith(group + "."):
            sub = key[len(group) + 1:]
            if group == "subset" and sub not in RunConfig.subset_keys:
                raise ConfigError(unknown_key(key, f"--set {item}"))
            if group == "preprocess":
                value = preprocess_value(key, value)
            values[group] = dict(values.get(group) or {}) | {sub: value}
            return
    if key not in {f.name for f in fields(RunConfig)} or key in NESTED:
        raise ConfigError(unknown_key(key, f"--set {item}"))
    values[key] = None if value.strip().lower() in ("null", "none", "~") else value


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that determines the results (an empty ``subset``, i.e. every image,
    is left out, so runs written before the key existed still compare equal)."""
    return {k: v for k, v in config.items() if k not in VOLATILE and (k != "subset" or v)}
