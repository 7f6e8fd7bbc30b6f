"""retain: continual learning with pre-trained and growing models, under one protocol."""

from .backbones import BACKBONES, Backbone, create_backbone
from .config import RunConfig, make_config
from .context import Context
from .datasets import DATASETS, DataBundle, Split, create_dataset
from .errors import ConfigError, DataError, RetainError, WeightsError
from .evaluation import evaluate
from .features import FeatureCache
from .methods import METHODS, Method, create_method
from .runner import run
from .scenarios import ClassIncremental, Task

__version__ = "0.1.0"
__all__ = ["BACKBONES", "Backbone", "ClassIncremental", "ConfigError", "Context", "DATASETS",
           "DataBundle", "DataError", "FeatureCache", "METHODS", "Method", "RetainError",
           "RunConfig", "Split", "Task", "WeightsError", "create_backbone", "create_dataset",
           "create_method", "evaluate", "make_config", "run"]
