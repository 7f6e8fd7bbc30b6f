"""The method protocol, its registry and its capability tags.

A method learns one task in place (``learn``), predicts logits over every class seen so far
(``predict``), and round-trips its state through a flat dict of tensors (``state_dict`` /
``load_state_dict``, saved as safetensors). ``__init__`` stores the backbone and the typed
hyper-parameters and does nothing else; learned state ends with an underscore.

What a method needs of its backbone and stream is declared, not discovered by a crash: each
class states ``needs`` (a ``Needs``: the backbone kinds it runs on, a least ViT depth, an input
size multiple, the stream kinds, a most number of tasks), and overrides the classmethod
``requirements(hp)`` where a hyper-parameter adds a need (APER's ``peft=adapter`` needs a ViT;
CODA-Prompt's ``layers`` need that many blocks). ``check_needs`` holds them against the light
descriptions of ``retain.specs`` (``BackboneSpec``, ``StreamSpec``), so the command line and
``retain.run`` refuse an impossible run before any data or weights load, with one line saying
why and what to set. Only the descriptions are read: no backbone is built. ``Needs`` and
its vocabulary (``FEATURES``, ``VIT``, ``VIT_OR_CLIP``, ``CLIP``, ``PIXELS``, ``NEW_CLASSES``)
live in ``retain.specs``, which imports no torch, so the catalog can hold the needs of each
method's defaults and the command line refuses those in milliseconds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .. import params as P
from .. import specs
from ..backbones import Backbone
from ..context import Context
from ..datasets.base import Split
from ..errors import ConfigError
from ..registry import Registry
from ..scenarios.base import Task
from ..specs import (  # noqa: F401  (the vocabulary of needs, for the method files)
    ANY_BACKBONE,
    CLIP,
    FEATURES,
    NEW_CLASSES,
    PIXELS,
    VIT,
    VIT_OR_CLIP,
    BackboneSpec,
    Needs,
    StreamSpec,
    blocks_needed,
    first_unmet,
)

# Capability tags: which conformance checks apply, and what a reader of results must know.
FROZEN_BACKBONE = "frozen_backbone"  # the backbone is never updated: features come from cache
FROZEN_AFTER_FIRST = "frozen_after_first"  # the backbone is adapted on task 0 only
GROWS = "grows_parameters"  # parameters are added with every task
USES_MEMORY = "uses_memory"  # stores training samples (exemplars) across tasks
TASK_ID_AT_TEST = "needs_task_id_at_test"  # predictions need the task id (not class-IL)
UPPER_BOUND = "upper_bound"  # sees all past data (joint training): a reference, not a method
TASK_FREE = "task_free"  # learns unmarked segments of a stream (no task boundary needed)
TAGS = {FROZEN_BACKBONE, FROZEN_AFTER_FIRST, GROWS, USES_MEMORY, TASK_ID_AT_TEST, UPPER_BOUND,
        TASK_FREE}


class Method(ABC):
    """Base of every continual-learning method. Subclasses implement ``_learn``/``_predict``
    and ``_state``/``_load_state``, and declare hyper-parameters as keyword-only arguments."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    tags: ClassVar[frozenset[str]] = frozenset()
    constraints: ClassVar[dict[str, P.Interval]] = {}
    needs: ClassVar[Needs] = Needs()  # what it needs whatever its hyper-parameters

    @classmethod
    def requirements(cls, hp: dict[str, Any]) -> list[Needs]:
        """What the method needs with hyper-parameters ``hp`` (all of them, defaults filled
        in). Override where a hyper-parameter adds a need; keep it to reading ``hp``."""
        return [cls.needs]

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.tasks_learned_ = 0
        self.num_classes_ = 0

    # -- protocol ---------------------------------------------------------------------------
    def learn(self, task: Task, ctx: Context) -> None:
        """Learn ``task`` in place. Tasks must come in order, each exactly once."""
        if self.tasks_learned_ == 0:
            P.check_constraints(type(self), self.hparams(), self.name)
        if task.id != self.tasks_learned_:
            raise ValueError(f"{self.name} has learned {self.tasks_learned_} task(s); it cannot "
                             f"learn task {task.id} next")
        self._learn(task, ctx)
        self.tasks_learned_ += 1
        self.num_classes_ = max(self.num_classes_, task.num_seen)

    @torch.no_grad()
    def predict(self, split: Split, ctx: Context, task_ids: np.ndarray | None = None
                ) -> torch.Tensor:
        """(len(split), num_classes_) logits; row i depends on sample i alone (no batch votes).

        ``task_ids`` (N,) reach only methods tagged ``needs_task_id_at_test`` (task-incremental
        streams); every other method predicts without them, so none can read the task at test.
        """
        if self.tasks_learned_ == 0:
            raise RuntimeError(f"{self.name} has not learned any task yet")
        if TASK_ID_AT_TEST in self.tags:
            if task_ids is None:
                raise ValueError(f"{self.name} needs the task id of every test sample")
            logits = self._predict(split, ctx, task_ids)
        else:
            logits = self._predict(split, ctx)
        assert logits.shape == (len(split), self.num_classes_), logits.shape
        return logits

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything learned, as tensors (the frozen backbone is identified, not stored)."""
        counters = torch.tensor([self.tasks_learned_, self.num_classes_])
        return {"_counters": counters, **self._state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a copy of ``state``: the method never shares tensors with the caller."""
        state = {k: v.clone() for k, v in state.items()}
        self.tasks_learned_, self.num_classes_ = (int(v) for v in state.pop("_counters"))
        self._load_state(state)

    @property
    def uses_batch_information(self) -> bool:
        """True when a prediction depends on the other samples of its test batch (an explicit,
        labelled option of a few methods: batch-wise prompt votes, per-batch task inference)."""
        return False

    def hparams(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in P.specs(type(self))}

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters (learned by the method so far) and total parameters used."""
        backbone = count(self.backbone.model)
        return {"trainable": 0, "total": backbone}

    # -- to implement -----------------------------------------------------------------------
    @abstractmethod
    def _learn(self, task: Task, ctx: Context) -> None: ...

    @abstractmethod
    def _predict(self, split: Split, ctx: Context) -> torch.Tensor: ...

    @abstractmethod
    def _state(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def _load_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({self.backbone.name}{', ' if args else ''}{args})"


def count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def decorate(cls: type[Method]) -> type[Method]:
        unknown = set(cls.tags) - TAGS
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown tags {unknown}")
        cls.name = name
        return METHODS.register(name)(cls)

    return decorate


def check_needs(name: str, hp: dict[str, Any], backbone: str, spec: BackboneSpec,
                size: int | None = None, stream: StreamSpec | None = None) -> None:
    """ConfigError (one line: why, and what to set) unless method ``name`` with the typed
    hyper-parameters ``hp`` (defaults filled in where missing) can run on backbone ``backbone``
    (``spec``, input ``size``; None: its default) and ``stream`` (None: not checked)."""
    cls = METHODS.get(name)
    hp = {n: d for n, (_, d) in P.specs(cls).items()} | hp
    if stream is not None and stream.task_free and TASK_FREE not in cls.tags:
        raise ConfigError(task_free_refusal(name))
    problem = first_unmet(name, cls.requirements(hp), backbone, spec, size, stream)
    if problem:
        raise ConfigError(problem)


def task_free_refusal(name: str) -> str:
    return specs.task_free_refusal(
        name, [n for n in METHODS.names() if TASK_FREE in METHODS.get(n).tags])


def create_method(name: str, backbone: Backbone, **params: Any) -> Method:
    """The method ``name`` on ``backbone``; ``params`` are validated (strings are parsed)."""
    cls = METHODS.get(name)
    return cls(backbone, **P.validate(cls, params, what=name))


def method_params(name: str) -> dict[str, tuple[Any, Any]]:
    """name -> (type, default) of the hyper-parameters of method ``name``."""
    return P.specs(METHODS.get(name))

