"""Continual-learning methods, registered by name. Adding a method: one file, one import line."""

from . import apd, aper, apg, coda_prompt, dap, den, dualprompt, dytox, ease, esn, finetune, hide_prompt, joint, l2p, lae, layup, ranpac, simplecil, slca, sprompts, supsup  # noqa: E402,F401  (registration)
from .base import (
    FROZEN_AFTER_FIRST,
    FROZEN_BACKBONE,
    GROWS,
    METHODS,
    TAGS,
    TASK_ID_AT_TEST,
    UPPER_BOUND,
    USES_MEMORY,
    Method,
    create_method,
    method_params,
    register_method,
)

__all__ = ["FROZEN_AFTER_FIRST", "FROZEN_BACKBONE", "GROWS", "METHODS", "TAGS",
           "TASK_ID_AT_TEST", "UPPER_BOUND", "USES_MEMORY", "Method", "create_method",
           "method_params", "register_method"]
