"""The machinery every recipe section shares: type-checked, frozen, self-validating fields.

A section is a frozen dataclass whose fields are checked against their annotations when
it is built (and again when an override replaces a field), then by its own `check()`,
so a bad value fails at start-up with an error that names the field.
"""
from __future__ import annotations

import dataclasses
import math
import string
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union


class RecipeError(ValueError):
    """A recipe, override or input the user can fix. The CLI prints it on one line and exits 2."""


# ---------------------------------------------------------------------------- types
def type_name(tp: Any) -> str:
    """How a field's type reads in an error message."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a comma-separated list of {type_name(args[0])}"
    if origin is Callable or tp is Callable:
        return "a callable or 'module:function'"
    if tp is type(None):
        return "none"
    if tp is bool:
        return "true/false"
    return getattr(tp, "__name__", str(tp))


def conforms(value: Any, tp: Any) -> bool:
    """Whether `value` is of the annotated type (bool is not an int, an int is a float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is Literal:
        return value in args
    if origin is tuple:
        return isinstance(value, tuple) and all(conforms(v, args[0]) for v in value)
    if origin is Callable or tp is Callable:
        return callable(value)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _wants_float(tp: Any) -> bool:
    return tp is float or (float in typing.get_args(tp) and int not in typing.get_args(tp))


class Section:
    """Base of every recipe section: type-checks each field, then runs `check()`."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # recipes may write lists where tuples are meant
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            if not conforms(value, hints[f.name]):
                raise RecipeError(
                    f"{self.key(f.name)} must be {type_name(hints[f.name])}, got {value!r}"
                )
            if type(value) is int and _wants_float(hints[f.name]):
                object.__setattr__(self, f.name, float(value))  # so 1 and 1.0 print and save alike
        self.check()

    section: typing.ClassVar[str] = ""

    def key(self, name: str) -> str:
        return f"{self.section}.{name}"

    def require(self, ok: bool, name: str, what: str) -> None:
        """Raise a RecipeError naming the field unless `ok`."""
        if not ok:
            raise RecipeError(f"{self.key(name)} {what}, got {getattr(self, name)!r}")

    def check(self) -> None:
        """Section-specific rules; the default has none."""


def _positive(section: Section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        section.require(value is None or (value > 0 and math.isfinite(value)), name, "must be > 0")


def template_columns(template: str) -> list[str]:
    """The column names a format string reads, in order, each once: '{a} and {b}' -> ['a', 'b']."""
    return list(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(template) if f is not None))


def template_fields(section: Section, name: str) -> list[str]:
    """The column names a format-string field (e.g. prompts.template) reads, checked; [] if unset."""
    template = getattr(section, name)
    if template is None:
        return []
    try:
        fields = template_columns(template)
    except ValueError as err:
        raise RecipeError(f"{section.key(name)} is not a valid format string ({err}); write columns as "
                          "{column} and a literal brace as {{ or }}") from None
    section.require(bool(fields) and all(f.isidentifier() for f in fields), name,
                    "must name dataset columns as {column} (plain names, e.g. '... {dialogue} ...')")
    return fields
