"""The base of every config section: unknown keys are errors, values are frozen, floats must be
finite (an infinite learning rate or a NaN threshold is a typo, never a setting), and a number
cannot be given as true/false (pydantic would read ``rounds: true`` as 1, ``clients: [true]`` as
client 1)."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from gradleak.errors import ConfigError

SECTION = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _numeric_only(annotation: Any) -> bool:
    """Whether a field takes numbers but not booleans (int, float, a literal of numbers such as
    ``Literal[1, 3]``, or an optional of them)."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) is typing.Literal:
        values = typing.get_args(annotation)
        return all(type(v) in (int, float) for v in values)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and all(_numeric_only(a) for a in args)
    return False


def _numeric_list(annotation: Any) -> bool:
    """Whether a field takes a list of numbers (``list[int]``, possibly inside a union)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if union else (annotation,)
    return any(
        typing.get_origin(a) is list and _numeric_only(typing.get_args(a)[0]) for a in options
    )


def _as_text(value: Any, annotation: Any) -> Any:
    """A boolean where a number (or a list item of numbers) belongs, as the text it was written
    as."""
    if isinstance(value, bool) and _numeric_only(annotation):
        return str(value).lower()
    if isinstance(value, list) and _numeric_list(annotation):
        return [str(v).lower() if isinstance(v, bool) else v for v in value]
    return value


class Section(BaseModel):
    model_config = SECTION

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        """A true/false given for a number is passed on as the text it was written as, so that the
        field's own validation refuses it under its own key."""
        if isinstance(data, dict):
            fields = cls.model_fields
            data = {
                k: _as_text(v, fields[k].annotation) if k in fields else v for k, v in data.items()
            }
        return data


def problem(err: Any) -> str:
    """One pydantic error as the words after its key."""
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    msg = err["msg"]
    if "input" in err and not isinstance(err["input"], dict | list):
        msg += f" (got {err['input']!r})"
    return msg


def one_line(exc: ValidationError, prefix: str = "", loc: list[Any] | None = None) -> ConfigError:
    """A validation error as the one line the user sees: the first problem under its dotted key
    (``prefix`` before it, ``loc`` instead of pydantic's own location), and how many more there
    are."""
    err = exc.errors()[0]
    parts = [str(p) for p in (err["loc"] if loc is None else loc)]
    key = ".".join(p for p in (prefix, *parts) if p)
    msg = problem(err)
    more = len(exc.errors()) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ConfigError(key, msg)
