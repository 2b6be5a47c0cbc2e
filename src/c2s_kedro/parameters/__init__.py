"""Pipeline parameters read once into small typed structures.

Each pipeline declares its settings as a frozen dataclass with no defaults of its own: the YAML
in ``conf/base/parameters_<pipeline>.yml`` is the one place defaults live. ``read_parameters``
turns the ``params:<section>`` dict a node receives into that dataclass, refusing unknown or
misspelt keys, values of the wrong type and values outside their range (a field declared with
``at_least``, ``greater_than`` or ``between``), naming the key, the section and where to fix it.
Errors raised in ``core/`` say what is wrong; ``setting_hint`` lets the calling node add which
setting changes it.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from typing import Any, TypeVar

from c2s_kedro.core.errors import C2SError

T = TypeVar("T")
ENVIRONMENT_HINT = "in your environment (e.g. conf/local/parameters.yml)"


# The namespace of the running node when its parameters are namespaced too (the screen's
# ``perturbation.data_processing``), set by a node hook, so that messages name the setting the
# user has to change and not the atlas's of the same shape.
PARAMETER_NAMESPACE: ContextVar[str | None] = ContextVar("parameter_namespace", default=None)


class ParameterError(C2SError, ValueError):
    """A parameter is unknown, missing, of the wrong type or outside its range."""


@dataclasses.dataclass(frozen=True)
class ValidRange:
    """The numbers a setting may take; for a list or a mapping, each of its items or values."""

    low: float
    high: float | None = None
    low_included: bool = True

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_included else value > self.low
        return above and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        if self.high is not None:
            return f"between {self.low:g} and {self.high:g}"
        return f"{'at least' if self.low_included else 'greater than'} {self.low:g}"


_RANGE = "valid_range"  # the key of a field's metadata holding its ValidRange


def at_least(low: float) -> Any:
    """A required dataclass field whose value (when not null) is ``>= low``: ``n_comps: int = at_least(1)``."""
    return dataclasses.field(metadata={_RANGE: ValidRange(low)})


def greater_than(low: float) -> Any:
    """A required dataclass field whose value (when not null) is ``> low``: ``temperature: float = greater_than(0)``."""
    return dataclasses.field(metadata={_RANGE: ValidRange(low, low_included=False)})


def between(low: float, high: float) -> Any:
    """A required dataclass field whose value (when not null) lies in ``[low, high]``: fractions, probabilities."""
    return dataclasses.field(metadata={_RANGE: ValidRange(low, high)})


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


def _check_range(field: dataclasses.Field, value: Any, name: str, section: str) -> Any:
    valid: ValidRange | None = field.metadata.get(_RANGE)
    if valid is None or value is None:
        return value
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else [(None, value)]
    for key, item in items:
        where = name if key is None else f"{name}[{key!r}]"
        number = isinstance(item, numbers.Real) and not isinstance(item, bool)
        if not number or item not in valid:
            raise ParameterError(
                f"{where} must be {'a number ' if not number else ''}{valid}, got {item!r}; fix it {ENVIRONMENT_HINT} "
                f"(defaults: {defaults_file(section)})"
            )
    return value


def read_parameters(cls: type[T], values: Mapping[str, Any] | T, section: str) -> T:
    """``values`` (the dict of ``params:<section>``) as the dataclass ``cls``.

    Nested dataclass fields are read recursively (``section.field``). Unknown keys, missing keys,
    values of the wrong basic type and values outside a field's range raise ``ParameterError``
    naming the key and the file to fix.
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
        name: _check_range(field, _check_value(hints[name], values[name], f"{section}.{name}", section), f"{section}.{name}", section)
        for name, field in fields.items() if name in values
    })


@contextmanager
def _adding_to(errors: tuple[type[Exception], ...], sentence: str) -> Iterator[None]:
    """Re-raise an error of ``errors`` (not a ``ParameterError``) with ``sentence`` after its message."""
    try:
        yield
    except ParameterError:
        raise
    except errors as error:
        message = str(error.args[0] if error.args else error).rstrip()
        if not message.endswith((".", "!", "?")):
            message += "."  # the hint is a sentence of its own
        # the same exception (type, attributes, traceback) with the sentence added to its message
        error.args = (f"{message} {sentence}", *error.args[1:])
        raise


@contextmanager
def setting_hint(setting: str, *errors: type[Exception]) -> Iterator[None]:
    """Re-raise an error of ``errors`` (default ``ValueError``, ``KeyError``) from core with the
    setting that changes it: ``... Change data_processing.qc in your environment (...)``."""
    setting = qualified(setting)
    with _adding_to(errors or (ValueError, KeyError), f"Change {setting} {ENVIRONMENT_HINT}; defaults are in {defaults_file(setting)}."):
        yield


@contextmanager
def settings_file_hint(section: str, *errors: type[Exception]) -> Iterator[None]:
    """For errors of ``errors`` whose message already names the settings that fix them (core was
    given the section's name): add where those settings are changed."""
    section = qualified(section)
    with _adding_to(errors, f"Settings are changed {ENVIRONMENT_HINT}; the defaults of {section} are in {defaults_file(section)}."):
        yield
