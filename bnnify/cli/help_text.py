"""Help that reads well: value names instead of type names, brackets kept, every option said.

Typer names a value by its type (`<list[str]>`, `<int range> [x>=0]`, `{model}`) and
Rich reads `[default: ...]` in a help text as markup, which swallows it. `readable`
fixes both on a command's declarations before the command is registered.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

from typer.models import ArgumentInfo, OptionInfo

__all__ = ["readable", "undocumented"]

# Names whose values have a form of their own; others are named after their type.
_BY_NAME = {
    "prior_arg": "KEY=VALUE",
    "posterior_arg": "KEY=VALUE",
    "model_arg": "NAME=VALUE",
    "include": "GLOB",
    "exclude": "GLOB",
    "filter": "GLOB",
    "only": "KINDS",
    "skip": "KINDS",
    "shard_size": "SIZE",
    "input_key": "NAME",
    "x_key": "NAME",
    "y_key": "NAME",
    "target": "COLUMN",
    "arch": "MODULE:CALLABLE",
    "arch_kwargs": "JSON",
    "device": "DEVICE",
    "dtype": "DTYPE",
    "weights": "mean|sample|ensemble:K",
    "top": "N",
}


def readable(function: Callable[..., Any]) -> Callable[..., Any]:
    """Sets value names and escapes brackets in the help of `function`'s parameters."""
    hints = typing.get_type_hints(function, include_extras=True)
    for name in inspect.signature(function).parameters:
        hint = hints.get(name)
        if typing.get_origin(hint) is not typing.Annotated:
            continue
        value_type, *extras = typing.get_args(hint)
        for info in extras:
            if isinstance(info, (OptionInfo, ArgumentInfo)):
                _fix(info, name, value_type)
        # Resolved once and kept: a string annotation would be evaluated anew by Typer.
        function.__annotations__[name] = hint
    return function


def undocumented(function: Callable[..., Any]) -> list[str]:
    """The parameters of `function` declared without a help text."""
    hints = typing.get_type_hints(function, include_extras=True)
    missing = []
    for name in inspect.signature(function).parameters:
        hint = hints.get(name)
        extras = typing.get_args(hint)[1:] if typing.get_origin(hint) is typing.Annotated else ()
        if not any(isinstance(i, (OptionInfo, ArgumentInfo)) and i.help for i in extras):
            missing.append(name)
    return missing


def _fix(info: OptionInfo | ArgumentInfo, name: str, value_type: Any) -> None:
    if info.help and "\\[" not in info.help:
        info.help = info.help.replace("[", "\\[")
    if info.metavar is not None:
        return
    base = _base(value_type)
    if base is bool:
        info.metavar = ""
    elif isinstance(info, ArgumentInfo):
        info.metavar = name.upper()
    else:
        info.metavar = _BY_NAME.get(name) or _type_name(base)


def _base(value_type: Any) -> Any:
    args = [a for a in typing.get_args(value_type) if a is not type(None)]
    if typing.get_origin(value_type) in (list, typing.Union) or type(value_type).__name__ in {
        "UnionType"
    }:
        return _base(args[0]) if args else value_type
    return value_type


def _type_name(base: Any) -> str:
    if isinstance(base, type) and issubclass(base, Enum):
        return "|".join(str(m.value) for m in base)
    if base is Path:
        return "PATH"
    return {int: "N", float: "X", str: "TEXT"}.get(base, "VALUE")
