"""Pipeline parameters read once into small typed structures.

Each pipeline declares its settings as a frozen dataclass with no defaults of its own: the YAML
in ``conf/base/parameters_<pipeline>.yml`` is the one place defaults live. ``read_parameters``
turns the ``params:<section>`` dict a node receives into that dataclass, refusing unknown or
misspelt keys and naming the key, the section and where to fix it. Errors raised in ``core/``
say what is wrong; ``setting_hint`` lets the calling node add which setting changes it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")
ENVIRONMENT_HINT = "in your environment (e.g. conf/local/parameters.yml)"


# The namespace of the running node when its parameters are namespaced too (the screen's
# ``perturbation.data_processing``), set by a node hook, so that messages name the setting the
# user has to change and not the atlas's of the same shape.
PARAMETER_NAMESPACE: ContextVar[str | None] = ContextVar("parameter_namespace", default=None)


class ParameterError(ValueError):
    """A parameter is unknown, missing or of the wrong type."""


def qualified(setting: str) -> str:
    """``setting`` with the running node's parameter namespace in front, if any."""
    namespace = PARAMETER_NAMESPACE.get()
    if not namespace or setting == namespace or setting.startswith(f"{namespace}."):
        return setting
    return f"{namespace}.{setting}"


def defaults_file(section: str) -> str:
    """The file in conf/base that holds a section's defaults (``perturbation.qc`` ->
    ``conf/base/parameters_perturbation.yml``)."""
    top = section.split(".")[0]
    if top == "data_split":
        top = "sentence_conversion"
    return f"conf/base/parameters_{top}.yml"


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional_inner(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (annotation, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _check_value(annotation: Any, value: Any, name: str, section: str) -> Any:
    inner, optional = _optional_inner(annotation)
    if value is None:
        if optional or annotation is Any:
            return None
        raise ParameterError(
            f"{name} is null but must be set; give it a value {ENVIRONMENT_HINT} (defaults: {defaults_file(section)})"
        )
    if dataclasses.is_dataclass(inner):
        return read_parameters(inner, value, name)
    origin = typing.get_origin(inner) or inner
    expected: tuple[type, ...] | None = {
        bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list, tuple), dict: (dict, Mapping),
    }.get(origin)
    if expected is None:  # Any, unions of several types, literals: not checked here
        return value
    wrong = not isinstance(value, expected) or (origin in (int, float) and isinstance(value, bool))
    if wrong:
        raise ParameterError(
            f"{name} must be {getattr(origin, '__name__', origin)}, got {value!r}; fix it {ENVIRONMENT_HINT} "
            f"(defaults: {defaults_file(section)})"
        )
    if origin is float:
        return float(value)
    if origin is list:
        return list(value)
    if origin is dict:
        return dict(value)
    return value


def read_parameters(cls: type[T], values: Mapping[str, Any] | T, section: str) -> T:
    """``values`` (the dict of ``params:<section>``) as the dataclass ``cls``.

    Nested dataclass fields are read recursively (``section.field``). Unknown keys, missing keys
    and values of the wrong basic type raise ``ParameterError`` naming the key and the file to fix.
    An instance of ``cls`` is returned unchanged, so a node can be called from a notebook with
    either.
    """
    if isinstance(values, cls):
        return values
    section = qualified(section)
    if not isinstance(values, Mapping):
        raise ParameterError(
            f"parameters '{section}' must be a mapping of settings, got {type(values).__name__}; see {defaults_file(section)}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParameterError(
            f"unknown parameter(s) {', '.join(f'{section}.{k}' for k in unknown)}; known keys of {section}: "
            f"{', '.join(fields)}. Fix the spelling {ENVIRONMENT_HINT} (defaults: {defaults_file(section)})"
        )
    missing = [name for name, f in fields.items() if name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ParameterError(
            f"parameter(s) {', '.join(f'{section}.{k}' for k in missing)} missing; every key of {section} is "
            f"listed with its default in {defaults_file(section)}: restore it there or set it {ENVIRONMENT_HINT}"
        )
    hints = _hints(cls)
    return cls(**{
        name: _check_value(hints[name], values[name], f"{section}.{name}", section)
        for name in fields if name in values
    })


@contextmanager
def setting_hint(setting: str, *errors: type[Exception]) -> Iterator[None]:
    """Re-raise an error of ``errors`` (default ``ValueError``, ``KeyError``) from core with the
    setting that changes it: ``... Change data_processing.qc in your environment (...)``."""
    kinds = errors or (ValueError, KeyError)
    try:
        yield
    except ParameterError:
        raise
    except kinds as error:
        message = str(error.args[0] if error.args else error).rstrip()
        if not message.endswith((".", "!", "?")):
            message += "."  # the hint is a sentence of its own
        setting = qualified(setting)
        # the same exception (type, attributes, traceback) with the setting added to its message
        error.args = (f"{message} Change {setting} {ENVIRONMENT_HINT}; defaults are in {defaults_file(setting)}.", *error.args[1:])
        raise
