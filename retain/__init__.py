"""retain: continual learning with pre-trained and growing models, under one protocol.

The public names below are imported on first use (module ``__getattr__``), so ``import retain``
and the ``retain`` command start without loading torch; ``retain.create_method`` and the
others import what they need when first touched.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_WHERE = {  # public name -> module that defines it
    "BACKBONES": "backbones", "Backbone": "backbones", "create_backbone": "backbones",
    "RunConfig": "config", "make_config": "config",
    "Context": "context",
    "DATASETS": "datasets", "DataBundle": "datasets", "Split": "datasets",
    "create_dataset": "datasets", "per_class_subset": "datasets",
    "ConfigError": "errors", "DataError": "errors", "RetainError": "errors",
    "WeightsError": "errors",
    "evaluate": "evaluation",
    "FeatureCache": "features",
    "METHODS": "methods", "Method": "methods", "create_method": "methods",
    "run": "runner",
    "ClassIncremental": "scenarios", "Task": "scenarios",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: retain.metrics
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'retain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .backbones import BACKBONES, Backbone, create_backbone  # noqa: F401
    from .config import RunConfig, make_config  # noqa: F401
    from .context import Context  # noqa: F401
    from .datasets import DATASETS, DataBundle, Split, create_dataset, per_class_subset  # noqa: F401
    from .errors import ConfigError, DataError, RetainError, WeightsError  # noqa: F401
    from .evaluation import evaluate  # noqa: F401
    from .features import FeatureCache  # noqa: F401
    from .methods import METHODS, Method, create_method  # noqa: F401
    from .runner import run  # noqa: F401
    from .scenarios import ClassIncremental, Task  # noqa: F401
