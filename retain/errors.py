"""Errors that retain raises on bad input. Each message names the problem and the fix."""


class RetainError(Exception):
    """Base class of every error retain raises on purpose."""


class ConfigError(RetainError, ValueError):
    """An unknown, ill-typed or conflicting configuration key or hyper-parameter."""


class StateError(RetainError, ValueError):
    """A saved state (checkpoint) that cannot be loaded as it is in this installation."""


class DataError(RetainError, FileNotFoundError):
    """A dataset that is missing, malformed or not where it was looked for."""


class WeightsError(RetainError, FileNotFoundError):
    """Backbone weights that cannot be obtained (offline, wrong file, wrong format)."""


class IntegrityError(RetainError, ValueError):
    """A file retain wrote earlier (results, checkpoint, cache) that fails verification on read."""


class RunLockedError(RetainError):
    """A run folder (or other resource) that another live retain process holds."""


class ServeError(RetainError):
    """A request the model server refuses (bad upload, over a limit, wrong state), with the HTTP
    status it answers (401, 404, 409, 413, 422, ...)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
