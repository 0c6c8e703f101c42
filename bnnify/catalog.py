"""The built-in posteriors and priors, read from the source of `bnnify.bnn` without importing torch.

`bnnify list` must start fast, and importing torch takes seconds. The registrations
are declarations, so they are read from `bnn/posteriors.py` and `bnn/priors.py` with
`ast`: the names from the `@<Factory>.register("name")` decorators (the first one is
the name, the others aliases), the arguments from the keyword-only parameters of the
method that takes them, with their defaults, and the description from the first
paragraph of the class docstring. `tests/test_catalog.py` checks the result against
the live registries.
"""

from __future__ import annotations

import ast
import math
from functools import cache
from importlib import resources
from typing import Any, NamedTuple

__all__ = ["POSTERIORS", "PRIORS", "Registered", "read_registrations", "registered"]


class Registered(NamedTuple):
    """A registered class as `bnnify list` shows it."""

    aliases: tuple[str, ...]
    class_name: str
    arguments: dict[str, Any]
    description: str


_SOURCES = {
    "posteriors": ("posteriors.py", "PosteriorFactory"),
    "priors": ("priors.py", "PriorFactory"),
}


@cache
def registered(kind: str) -> dict[str, Registered]:
    """The classes registered in `bnnify.bnn` (kind "posteriors" or "priors"), in source order."""
    file, _ = _SOURCES[kind]
    return read_registrations((resources.files("bnnify") / "bnn" / file).read_text("utf-8"), kind)


def read_registrations(source: str, kind: str) -> dict[str, Registered]:
    """The classes that Python `source` registers with the factory of `kind`."""
    factory = _SOURCES[kind][1]
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    table = {}
    for cls in classes.values():
        names = _registered_names(cls, factory)
        if names:
            arguments = _arguments(cls, classes, kind)
            table[names[0]] = Registered(tuple(names[1:]), cls.name, arguments, _summary(cls))
    return table


def _registered_names(cls: ast.ClassDef, factory: str) -> list[str]:
    names = []
    for decorator in cls.decorator_list:
        if (
            isinstance(decorator, ast.Call)
            and isinstance(decorator.func, ast.Attribute)
            and decorator.func.attr == "register"
            and isinstance(decorator.func.value, ast.Name)
            and decorator.func.value.id == factory
        ):
            names.append(ast.literal_eval(decorator.args[0]).strip().lower())
    return names


def _method(
    cls: ast.ClassDef, name: str, classes: dict[str, ast.ClassDef]
) -> ast.FunctionDef | None:
    """`name` as `cls` resolves it: its own, else its first base's in the same file."""
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            found = _method(classes[base.id], name, classes)
            if found is not None:
                return found
    return None


def _arguments(cls: ast.ClassDef, classes: dict[str, ast.ClassDef], kind: str) -> dict[str, Any]:
    """The keyword-only arguments (and defaults) a spec may give the class.

    A posterior takes those of `from_param`, or of `initialize_` when `from_param`
    hands its keyword arguments there; a prior those of its constructor, except the
    ones its `from_param` fills in itself (the empirical prior's `mu`).
    """
    from_param = _method(cls, "from_param", classes)
    filled: set[str] = set()
    if kind == "posteriors":
        delegates = from_param is not None and any(
            isinstance(node, ast.Attribute) and node.attr == "initialize_"
            for node in ast.walk(from_param)
        )
        function = _method(cls, "initialize_", classes) if delegates else from_param
    else:
        function = _method(cls, "__init__", classes)
        filled = _filled_by(from_param) if from_param is not None else set()
    assert function is not None, f"{cls.name} has no method taking its arguments"
    arguments = function.args
    return {
        arg.arg: None if default is None else _value(default)
        for arg, default in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True)
        if arg.arg not in filled
    }


def _filled_by(from_param: ast.FunctionDef) -> set[str]:
    """Keyword arguments a prior's `from_param` passes to `cls(...)` itself."""
    return {
        keyword.arg
        for node in ast.walk(from_param)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "cls"
        for keyword in node.keywords
        if keyword.arg is not None
    }


def _value(node: ast.expr) -> Any:
    """A default value: a literal, or `math.<function>(<literals>)` such as `math.exp(-6)`."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "math"
    ):
        return getattr(math, node.func.attr)(*(ast.literal_eval(a) for a in node.args))
    return ast.literal_eval(node)


def _summary(cls: ast.ClassDef) -> str:
    """The first paragraph of the docstring, on one line, without its final period."""
    docstring = ast.get_docstring(cls) or ""
    return " ".join(docstring.split("\n\n")[0].split()).removesuffix(".")


POSTERIORS = registered("posteriors")
PRIORS = registered("priors")
