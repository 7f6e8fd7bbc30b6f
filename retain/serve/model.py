"""What a server (or ``retain predict``) serves: a method rebuilt from a state, the names of its
classes, and the form its inputs take.

A served method is rebuilt through the protocol only: ``create_backbone`` + ``create_method``
with the run's hyper-parameters + ``load_state_dict`` (for a run folder through
``runner.restore``). Uploaded images reach the method in the form of the data it was trained on
(``InputFormat``): a method trained on an in-memory array dataset (MNIST-5k: 28x28 gray uint8)
gets each image converted to that shape and colour, then preprocessed as those arrays were
(resized whole); a method trained on image files (folder datasets), or started empty, gets image
files, preprocessed as files are (shorter side resized, centre crop).
"""

from __future__ import annotations

import copy
import io
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..backbones import Backbone, create_backbone
from ..context import Context, resolve_device
from ..datasets.base import Split
from ..errors import ConfigError, DataError
from ..features import FeatureCache
from ..io import read_json
from ..methods import METHODS, Method, create_method
from ..methods.base import FROZEN_BACKBONE, TASK_ID_AT_TEST, USES_MEMORY
from ..verify import load_results
from .images import Upload

# Methods that learn from new images of classes they already know (a learn request may name
# known classes), measured by benchmarks/serve_known_classes.py: after a task of known classes
# only, their predictions change. The others are refused such a request (422): simplecil and
# aper build a class's prototype once, from the task that brings it, and would silently ignore
# the images, as would sprompts on that stream (its predictions did not change); ease, esn,
# hide_prompt and slca refuse a task without new classes themselves.
# A method added later is refused until it is measured and listed here.
KNOWN_CLASS_METHODS = frozenset({
    "apg", "coda_prompt", "dap", "dualprompt", "dytox", "ewc", "finetune", "icarl", "joint",
    "l2p", "lae", "layup", "lwf", "promptfusion", "proof", "ranpac", "replay",
    "supsup_gn", "zscl"})
# Streams whose test images are transformed copies (a permutation, a rotation): a served model
# would need the same transform on every image it is sent.
UNSERVABLE_SCENARIOS = ("TIL-", "Permuted", "Rotated", "Superclass-TIL")


@dataclass(frozen=True)
class InputFormat:
    """``array``: images become uint8 arrays of ``shape`` ((H, W) gray or (H, W, 3) RGB);
    ``file``: images stay encoded files."""

    kind: str = "file"
    shape: tuple[int, ...] = ()

    @classmethod
    def of(cls, split: Split) -> InputFormat:
        return cls("file") if split.is_paths else cls("array", tuple(split.data.shape[1:]))

    @classmethod
    def from_dict(cls, d: dict) -> InputFormat:
        return cls(d["kind"], tuple(d.get("shape", ())))

    def array(self, image: Image.Image) -> np.ndarray:
        """One RGB image as this format's uint8 array."""
        h, w = self.shape[:2]
        gray = len(self.shape) == 2
        im = image.convert("L" if gray else "RGB").resize((w, h), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8)  # (H, W) or (H, W, 3)

    def describe(self) -> str:
        if self.kind == "file":
            return "image files (shorter side resized, centre crop)"
        return f"{'x'.join(map(str, self.shape))} uint8 arrays (resized whole), as trained"


@dataclass(frozen=True)
class Spec:
    """Everything that rebuilds the served method from a state (server.json)."""

    method: str
    params: dict
    backbone: str
    weights: str | None = None
    image_size: int | None = None
    seed: int = 1993
    format: InputFormat = field(default_factory=InputFormat)
    store_key: str = ""  # the content key every learned split shares (exemplar memories concat)
    store_offset: int = 0  # first index of learned images in that split
    origin: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self) | {"format": asdict(self.format)}

    @classmethod
    def from_dict(cls, d: dict) -> Spec:
        return cls(**(d | {"format": InputFormat.from_dict(d["format"])}))

    @property
    def uses_memory(self) -> bool:
        return USES_MEMORY in METHODS.get(self.method).tags

    @property
    def learns_known_classes(self) -> bool:
        return self.method in KNOWN_CLASS_METHODS


def check_servable(method: str, scenario: str | None = None) -> None:
    """ConfigError for a method or stream a server cannot answer for."""
    cls = METHODS.get(method)
    if TASK_ID_AT_TEST in cls.tags:
        raise ConfigError(f"{method} needs the task id of every test image, which a client "
                          f"sending an image does not have; serve a class-incremental method")
    if scenario and scenario.split(":")[-1].startswith(UNSERVABLE_SCENARIOS):
        raise ConfigError(f"a model learned on the {scenario} stream cannot be served: its "
                          f"test images are transformed copies or need a task id")


def backbone_for(spec: Spec, pristine: Backbone) -> Backbone:
    """The frozen backbone is shared; a method that may update its backbone gets a copy."""
    if FROZEN_BACKBONE in METHODS.get(spec.method).tags:
        return pristine
    return copy.deepcopy(pristine)


def build(spec: Spec, pristine: Backbone, state: dict[str, torch.Tensor] | None) -> Method:
    """The method of ``spec`` holding ``state`` (None: a fresh, empty method)."""
    method = create_method(spec.method, backbone_for(spec, pristine), **spec.params)
    if state is not None:
        method.load_state_dict(state)
    return method


def create_pristine(spec: Spec) -> Backbone:
    return create_backbone(spec.backbone, spec.weights, spec.image_size)


# -- run folders ------------------------------------------------------------------------------
def read_run(run_dir: str | Path) -> tuple[dict, dict]:
    """config.json and results.json of a run folder with at least one finished task."""
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").is_file() or not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} holds no results.json/config.json; pass a run folder "
                          f"written by `retain run` (or a state folder of `retain serve`)")
    config, results = read_json(run_dir / "config.json"), load_results(run_dir)  # validated
    if not results.get("stages"):
        raise ConfigError(f"{run_dir} has no finished task yet; run `retain run` to the end of "
                          f"at least one task first")
    return config, results


def run_spec(run_dir: str | Path, *, learning: bool = False) -> tuple[Spec, tuple[str, ...]]:
    """The spec of a run folder and the names of the classes of its last checkpoint.

    The dataset is loaded (once) to learn the input format and the key of the training split;
    when it cannot be (a folder dataset that is not on this machine), images are served as
    files, unless ``learning`` with an exemplar memory (which must extend that split).
    """
    run_dir = Path(run_dir)
    config, results = read_run(run_dir)
    check_servable(config["method"], config.get("scenario"))
    need_split = learning and USES_MEMORY in METHODS.get(config["method"]).tags
    last = results["stages"][-1]
    names = tuple(results["class_names"][: last["num_classes"]])
    fmt, key, size = InputFormat("file"), f"serve-{uuid.uuid4().hex[:12]}", 0
    try:
        from ..datasets import create_dataset

        train = create_dataset(config["dataset"], config.get("data_root")).load().train
        fmt, key, size = InputFormat.of(train), train.key, len(train)
    except (DataError, ConfigError, OSError) as e:
        if need_split:
            raise ConfigError(f"{config['method']} keeps exemplars of its training split, so "
                              f"learning needs the run's dataset {config['dataset']!r}, which "
                              f"could not be loaded: {e}") from None
        import logging

        logging.getLogger("retain.serve").warning(
            "the run's dataset %r could not be loaded to read its image format (%s); images "
            "are fed as files (resize + centre crop)", config["dataset"], str(e)[:200])
    spec = Spec(config["method"], dict(config.get("params") or {}), config["backbone"],
                config.get("weights"), config.get("image_size"), config.get("seed", 1993),
                fmt, key, size, {"run_dir": str(run_dir.absolute()), "task": last["task"],
                                 "tasks_in_run": results.get("num_tasks")})
    return spec, names


def run_state(run_dir: str | Path, spec: Spec, pristine: Backbone) -> Method:
    """The method of a run folder as its last checkpoint left it (``runner.restore``)."""
    from ..runner import restore

    run_dir = Path(run_dir)
    method = build(spec, pristine, None)
    restore(method, run_dir, load_results(run_dir), spec.origin["task"])  # hash-verified
    return method


def fresh_spec(method: str, backbone: str, params: dict | None = None, *,
               weights: str | None = None, image_size: int | None = None,
               seed: int = 1993) -> Spec:
    """The spec of a server that starts empty (no class known): inputs are image files."""
    check_servable(method)
    from ..params import validate

    validate(METHODS.get(method), dict(params or {}), what=method)
    return Spec(method, dict(params or {}), backbone, weights, image_size, seed,
                InputFormat("file"), f"serve-{uuid.uuid4().hex[:12]}", 0, {"fresh": True})


# -- inputs and predictions ---------------------------------------------------------------------
def split_of(uploads: list[Upload], fmt: InputFormat, targets=None, *, key: str | None = None,
             index: np.ndarray | None = None, paths: list[str] | None = None) -> Split:
    """A Split of uploaded images in ``fmt``: arrays, the given file ``paths``, or (files with
    no path: predictions) in-memory file objects, which ``Split.image`` opens like paths."""
    n = len(uploads)
    targets = np.zeros(n, np.int64) if targets is None else np.asarray(targets, np.int64)
    if fmt.kind == "array":
        data = np.stack([fmt.array(u.image) for u in uploads])  # (N, H, W[, 3])
    else:
        data = np.empty(n, dtype=object)
        for i, u in enumerate(uploads):
            data[i] = paths[i] if paths is not None else io.BytesIO(u.data)
    key = key or f"upload-{uuid.uuid4().hex[:12]}"
    return Split(data, targets, key=key, index=index)


@dataclass
class Model:
    """One served version: a method, its class names, and the version number."""

    method: Method
    class_names: tuple[str, ...]
    version: int
    format: InputFormat
    device: str = "cpu"
    batch_size: int = 32

    def context(self) -> Context:
        return Context(device=resolve_device(self.device), batch_size=self.batch_size,
                       cache=FeatureCache(None))

    def logits(self, uploads: list[Upload]) -> torch.Tensor:
        """(N, C) logits of the method on the uploaded images."""
        return self.method.predict(split_of(uploads, self.format), self.context())

    def top_k(self, uploads: list[Upload], k: int = 5) -> list[list[dict]]:
        """The k best classes of each image: name, score (the method's logit; a cosine for
        prototype methods) and probability (softmax of the logits)."""
        logits = self.logits(uploads)  # (N, C)
        probs = logits.float().softmax(1)
        k = max(1, min(k, logits.shape[1]))
        scores, labels = logits.float().topk(k, dim=1)  # (N, k)
        return [[{"class": self.class_names[int(c)], "label": int(c), "score": float(s),
                  "probability": float(probs[i, c])} for s, c in
                  zip(scores[i], labels[i], strict=True)]
                for i in range(len(uploads))]


def load_model(source: str | Path, device: str = "cpu") -> Model:
    """The model of a run folder (its last checkpoint) or of a serve state folder (its latest
    version), for ``retain predict``."""
    from .store import VersionStore

    store = VersionStore(source)
    if store.exists:
        spec = Spec.from_dict(store.spec())
        v = store.latest()
        if v is None:
            raise ConfigError(f"{source} has no version yet: teach the server a class first")
        state, meta = store.read(v)
        method = build(spec, create_pristine(spec), state)
        return Model(method, tuple(meta["classes"]), v, spec.format, device)
    spec, names = run_spec(source)
    method = run_state(source, spec, create_pristine(spec))
    return Model(method, names, 0, spec.format, device)
