"""Typed hyper-parameters, validated in one place (the scikit-learn pattern).

A method's hyper-parameters are the keyword-only arguments of its ``__init__`` (after the
backbone), with annotations and defaults; range constraints are declared once per class in
``constraints``. ``validate`` turns user input (YAML values, or strings from ``--set``) into
typed values and rejects unknown keys, wrong types and out-of-range values with an error that
names the key and the valid choices.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class Interval:
    """low <(=) value <(=) high; None means unbounded."""

    low: float | None = None
    high: float | None = None
    closed: str = "both"  # "both", "left", "right", "neither"

    def __contains__(self, v: float) -> bool:
        lo_ok = self.low is None or (v >= self.low if self.closed in ("both", "left") else
                                     v > self.low)
        hi_ok = self.high is None or (v <= self.high if self.closed in ("both", "right") else
                                      v < self.high)
        return lo_ok and hi_ok

    def __str__(self) -> str:
        left = "[" if self.closed in ("both", "left") else "("
        right = "]" if self.closed in ("both", "right") else ")"
        lo = "-inf" if self.low is None else self.low
        hi = "inf" if self.high is None else self.high
        return f"{left}{lo}, {hi}{right}"


def specs(cls: type) -> dict[str, tuple[Any, Any]]:
    """name -> (annotation, default) of the keyword-only parameters of ``cls.__init__``."""
    hints = typing.get_type_hints(cls.__init__)
    sig = inspect.signature(cls.__init__)
    return {n: (hints.get(n, Any), p.default) for n, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def validate(cls: type, given: dict[str, Any], *, what: str = "") -> dict[str, Any]:
    """Typed values for ``given``; unknown keys, wrong types and bad ranges are ConfigErrors."""
    what = what or getattr(cls, "name", cls.__name__)
    return check(specs(cls), getattr(cls, "constraints", {}), given, what)


def check(table: dict[str, tuple[Any, Any]], constraints: dict[str, Interval],
          given: dict[str, Any], what: str, kind: str = "hyper-parameter") -> dict[str, Any]:
    """``validate`` on a table name -> (annotation, default) (e.g. from ``retain.catalog``)."""
    if not isinstance(given, dict):
        raise ConfigError(f"the {kind}s of {what} must be a mapping of names to values, "
                          f"got {given!r}")
    unknown = sorted((str(k) for k in set(given) - set(table)), key=str)
    if unknown:
        raise ConfigError(unknown_message(kind, unknown[0], table, f"of {what}"))
    out = {}
    for name, value in given.items():
        out[name] = coerce(value, table[name][0], f"{what}.{name}")
    check_constraints_table(constraints, {n: d for n, (_, d) in table.items()} | out, what)
    return out


def unknown_message(kind: str, key: str, valid, where: str = "", otherwise: str = "") -> str:
    """"unknown KIND 'key' WHERE; did you mean 'x'?" when a valid name is close (difflib), else
    the list of valid names (and ``otherwise``, a hint on where the key may belong)."""
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=2, cutoff=0.6)
    head = f"unknown {kind} {key!r}{' ' + where if where else ''}"
    if close:
        return f"{head}; did you mean {' or '.join(repr(c) for c in close)}?"
    return f"{head}; valid: {', '.join(valid) or '(none)'}{otherwise}"


def check_constraints(cls: type, values: dict[str, Any], what: str) -> None:
    check_constraints_table(getattr(cls, "constraints", {}), values, what)


def check_constraints_table(constraints: dict[str, Interval], values: dict[str, Any],
                            what: str) -> None:
    for name, interval in constraints.items():
        v = values.get(name)
        if v is not None and v not in interval:
            raise ConfigError(f"{what}.{name} = {v!r} is out of range; it must lie in {interval}")


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` as ``annotation``; strings are read as YAML scalars first ('1e-3', 'true')."""
    if isinstance(value, str) and annotation is not str:
        value = _yaml_scalar(value)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key} = {value!r} is not a valid {_name(annotation)}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key} = {value!r} is not one of {list(args)}{hint}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} = {value!r} must be a list of {_name(args[0])}")
        return origin(coerce(v, args[0], key) for v in value)
    return _scalar(value, annotation, key)


def _yaml_scalar(text: str) -> Any:
    """``text`` read as a YAML value ('1e-3', 'true', '[1, 2]'), or ``text`` itself where it is
    not valid YAML (then the type check names the key and the expected type)."""
    if not text.strip():
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _scalar(value: Any, annotation: type, key: str) -> Any:
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation in (bool, str) and isinstance(value, annotation):
        return value
    if annotation not in (int, float, bool, str) and isinstance(value, annotation):
        return value
    raise ConfigError(f"{key} = {value!r} has type {type(value).__name__}; expected "
                      f"{_name(annotation)}")


def _name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


# -- annotations as text (the catalog stores them; ``annotation`` reads them back) -----------
def type_text(annotation: Any) -> str:
    """``annotation`` as Python source that ``annotation()`` turns back into it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return "Any"
    if annotation is type(None) or annotation is None:
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_text(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    return annotation.__name__


_NAMES = {"Any": Any, "Literal": Literal, "None": None, "int": int, "float": float,
          "bool": bool, "str": str, "tuple": tuple, "list": list, "dict": dict}


def annotation(text: str) -> Any:
    """The annotation written as ``text`` by ``type_text``."""
    return eval(text, {"__builtins__": {}}, dict(_NAMES))  # noqa: S307 (our own catalog text)


def describe_type(annotation: Any) -> str:
    """A short human reading: 'int', 'float or None', 'one of: a, b', 'list of int'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin is Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if origin in (tuple, list):
        return f"list of {describe_type(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))
