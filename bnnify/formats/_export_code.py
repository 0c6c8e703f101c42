"""Checks that text from a torch.export archive, run by torch as Python, can only be data."""

from __future__ import annotations

import ast
import contextlib
import enum
import inspect
import json
import re
import sys
from collections.abc import Mapping
from typing import Any

import sympy
import torch

__all__ = [
    "CodeRefused",
    "check_graph",
    "check_guard",
    "check_program",
    "check_python_code",
    "check_sym_expr",
    "check_treespec",
]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PLACEHOLDER = re.compile(r"\*{0,2}[A-Za-z_][A-Za-z0-9_]*\Z")
_NUMBER = re.compile(r"-?([0-9][0-9.eE+\-]*|inf|nan)\Z")
_MAX_EXPR = 1 << 16
# sympy constructors whose first argument may be a string (a name or a number), as
# `sympy.srepr` writes them; every other sympy function sympifies (evaluates) strings.
_STRING_FIRST = {"Symbol": _IDENTIFIER, "Dummy": _IDENTIFIER}
_STRING_FIRST.update(dict.fromkeys(("Float", "Integer", "Rational"), _NUMBER))
_ARITHMETIC = (
    ast.Expression, ast.Load, ast.Constant, ast.Name, ast.Call, ast.keyword, ast.Tuple,
    ast.UnaryOp, ast.UAdd, ast.USub, ast.Not, ast.BinOp, ast.Add, ast.Sub, ast.Mult,
    ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.Compare, ast.Eq, ast.NotEq, ast.Lt,
    ast.LtE, ast.Gt, ast.GtE, ast.BoolOp, ast.And, ast.Or,
)  # fmt: skip
# Guards, as torch writes them: "L['x'].size()[0] <= 64", "math.isnan(L['t'])".
_GUARD_NODES = (*_ARITHMETIC, ast.Subscript, ast.Attribute)
_GUARD_FUNCTIONS = {"max", "min", "abs", "int", "float", "round"}
_GUARD_METHODS = {"size", "stride", "storage_offset", "dim", "numel"}
_GUARD_MATH = {"isnan", "isinf", "floor", "ceil", "trunc", "sqrt", "inf", "nan", "pi", "e"}
# Statements and expressions fx never writes, each a way to run code at definition.
_NOT_FX = (
    ast.Lambda, ast.GeneratorExp, ast.ListComp, ast.SetComp, ast.DictComp, ast.NamedExpr,
    ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal, ast.ClassDef, ast.FunctionDef,
    ast.AsyncFunctionDef, ast.Yield, ast.YieldFrom, ast.Await, ast.JoinedStr,
)  # fmt: skip
_FX_BUILTINS = {"getattr", "slice"}
_FACTORIES = {"list", "dict", "set", "frozenset", "tuple", "int", "float", "str", "bool"}


class CodeRefused(Exception):
    """The text would run as code beyond what torch itself writes."""


def check_sym_expr(text: str, names: Mapping[str, object]) -> None:
    """Accepts a shape expression that `sympy.sympify` can only build, not run.

    `sympify` evaluates its string as Python. Accepted: calls of sympy classes or of
    `names` (the functions and symbols torch passes), numbers, arithmetic and
    comparisons, and strings only as the name of a `Symbol` or the digits of a number.

    Raises:
        CodeRefused: Otherwise.
    """
    tree = _parse(text, "a shape expression", mode="eval")
    strings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
            pattern, first = _STRING_FIRST.get(node.func.id), node.args[0]
            if pattern and isinstance(first, ast.Constant) and _matches(pattern, first.value):
                strings.add(id(first))
    for node in ast.walk(tree):
        if not isinstance(node, _ARITHMETIC):
            _refuse("a shape expression", text)
        if isinstance(node, ast.Call) and not isinstance(node.func, ast.Name):
            _refuse("a shape expression", text)
        if isinstance(node, ast.Name) and not (node.id in names or _is_sympy(node.id)):
            _refuse("a shape expression", text)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in strings
        ):
            _refuse("a shape expression", text)


def check_guard(text: str) -> None:
    """Accepts an input guard of the form torch writes (`L['x'].size()[0] <= 64`).

    Raises:
        CodeRefused: If the guard would do more than compare sizes and values.
    """
    tree = _parse(text, "an input guard", mode="eval")
    for node in ast.walk(tree):
        if not isinstance(node, _GUARD_NODES) or isinstance(node, ast.keyword):
            _refuse("an input guard", text)
        if isinstance(node, ast.Constant) and not _plain_value(node.value):
            _refuse("an input guard", text)
        if isinstance(node, ast.Name) and node.id not in {"L", "math", *_GUARD_FUNCTIONS}:
            _refuse("an input guard", text)
        if isinstance(node, ast.Attribute) and not _guard_attribute(node):
            _refuse("an input guard", text)
        if isinstance(node, ast.Call) and not _guard_call(node):
            _refuse("an input guard", text)


def check_graph(graph: torch.fx.Graph) -> None:
    """Accepts a graph whose names fx can write into Python code without escaping.

    fx writes placeholder targets, attribute paths, keyword names and the original
    argument names of a pytree signature into the generated source as they are.

    Raises:
        CodeRefused: If one of them could end a name or a string in that source.
    """
    for node in graph.nodes:
        target = node.target
        if not _IDENTIFIER.match(node.name):
            _refuse("a graph node name", node.name)
        if node.op == "placeholder" and not _PLACEHOLDER.match(str(target)):
            _refuse("a graph input name", str(target))
        if node.op in ("get_attr", "call_module", "call_method") and not _attribute_path(target):
            _refuse("a graph attribute name", str(target))
        for key in node.kwargs:
            if not _IDENTIFIER.match(key):
                _refuse("a graph keyword name", key)
    info = getattr(graph._codegen, "pytree_info", None)
    for name in getattr(info, "orig_args", None) or ():
        if not _IDENTIFIER.match(name):
            _refuse("a program argument name", name)


def check_program(program: Any) -> None:
    """Accepts an `ExportedProgram` from which torch can later generate only data code.

    Checks its graphs (`check_graph`), its signature's argument names, and the input
    guards that `program.module()` compiles (`check_guard`).

    Raises:
        CodeRefused: Otherwise.
    """
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            check_graph(module.graph)
    for entry in program.module_call_graph:
        for name in getattr(entry.signature, "forward_arg_names", None) or ():
            if not _IDENTIFIER.match(name):
                _refuse("a program argument name", name)
    for guard in program._guards_code:  # no public accessor in torch 2.13
        check_guard(guard)


def check_python_code(code: Any) -> None:
    """Accepts fx-generated source that only defines functions, as fx writes them.

    Defining the functions must run nothing (no decorators, defaults or annotations),
    and their bodies may only name their arguments, their own variables, the globals
    fx registered for the graph and `getattr`/`slice`, without dunder attributes.

    Raises:
        CodeRefused: Otherwise.
    """
    source, known = code.src, set(code.globals) | _FX_BUILTINS
    if any(not c.isprintable() and c != "\n" for c in source):
        _refuse("generated code", source)
    tree = _parse(source, "generated code", mode="exec")
    for statement in tree.body:
        if not isinstance(statement, ast.FunctionDef):
            _refuse("generated code", ast.unparse(statement))
        _check_function(statement, known)


def check_treespec(text: str) -> None:
    """Accepts a serialized pytree spec whose contexts import nothing.

    torch resolves an enum in a context (a JSON string) by importing its module, and a
    defaultdict's factory (a JSON object) by importing it: an enum must belong to an
    already imported module, a factory must be a builtin type.

    Raises:
        CodeRefused: Otherwise.
    """
    try:
        nodes = [json.loads(text)[1]]
    except (ValueError, TypeError, IndexError, KeyError):
        return  # torch reports it
    while nodes:
        node = nodes.pop()
        if not isinstance(node, dict):
            continue
        context = node.get("context")
        if isinstance(context, str):
            with contextlib.suppress(ValueError, TypeError):  # torch reports it
                json.loads(context, object_hook=_check_enum)
        if isinstance(context, dict) and "default_factory_module" in context:
            module, factory = context["default_factory_module"], context.get("default_factory_name")
            if module != "builtins" or factory not in _FACTORIES:
                _refuse("a defaultdict factory import", f"{module}.{factory}")
        nodes.extend(node.get("children_spec") or [])


# ------------------------------------------------------------------- helpers


def _parse(text: str, what: str, *, mode: str) -> ast.AST:
    """The syntax tree of `text`; an expression must be short printable ASCII, no comment."""
    printable = text.isascii() and text.isprintable() and not any(c in text for c in "#\\")
    if mode == "eval" and (len(text) > _MAX_EXPR or not printable):
        _refuse(what, text)
    try:
        return ast.parse(text, mode=mode)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        _refuse(what, text)


def _matches(pattern: re.Pattern, value: object) -> bool:
    return isinstance(value, str) and pattern.match(value) is not None


def _plain_value(value: object) -> bool:
    """A number, or a string that cannot close the quotes torch writes it into."""
    return not isinstance(value, str) or not any(c in value for c in "\"'\\")


def _is_sympy(name: str) -> bool:
    found = None if name.startswith("_") else getattr(sympy, name, None)
    return isinstance(found, sympy.Basic) or (
        isinstance(found, type) and issubclass(found, sympy.Basic)
    )


def _guard_attribute(node: ast.Attribute) -> bool:
    if isinstance(node.value, ast.Name) and node.value.id == "math":
        return node.attr in _GUARD_MATH
    return node.attr in _GUARD_METHODS


def _guard_call(node: ast.Call) -> bool:
    if node.keywords:
        return False
    func = node.func
    if isinstance(func, ast.Name):
        return func.id in _GUARD_FUNCTIONS
    if isinstance(func, ast.Attribute) and func.attr in _GUARD_METHODS:
        return not node.args and _is_input(func.value)
    return isinstance(func, ast.Attribute)  # math.<name>, checked by _guard_attribute


def _is_input(node: ast.AST) -> bool:
    """`L`, or an item or a size of it: what guards compare."""
    while isinstance(node, (ast.Subscript, ast.Call)):
        node = node.value if isinstance(node, ast.Subscript) else node.func
        if isinstance(node, ast.Attribute):
            node = node.value
    return isinstance(node, ast.Name) and node.id == "L"


def _attribute_path(target: object) -> bool:
    """A dotted path fx can write as `a.b` or `getattr(a, "b")` without escaping."""
    if not isinstance(target, str):
        return False
    parts = target.split(".")
    return all(p and p.isprintable() and '"' not in p and "\\" not in p for p in parts)


def _check_function(function: ast.FunctionDef, globals_: set[str]) -> None:
    arguments = function.args
    every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
    every += [a for a in (arguments.vararg, arguments.kwarg) if a is not None]
    defaults = [*arguments.defaults, *(d for d in arguments.kw_defaults if d is not None)]
    if function.decorator_list or function.returns or defaults:
        _refuse("generated code", function.name)
    if any(a.annotation is not None for a in every):
        _refuse("generated code", function.name)
    names = {a.arg for a in every} | globals_
    names |= {n.id for n in ast.walk(function) if isinstance(n, ast.Name)
              and isinstance(n.ctx, ast.Store)}  # fmt: skip
    for node in ast.walk(function):
        if node is not function and isinstance(node, _NOT_FX):
            _refuse("generated code", ast.unparse(node))
        if isinstance(node, ast.Name) and node.id not in names:
            _refuse("generated code", node.id)
        if isinstance(node, ast.Attribute) and node.attr.startswith("__"):
            _refuse("generated code", node.attr)


def _check_enum(found: dict) -> dict:
    """Mirrors torch's pytree `enum_object_hook`, without importing or calling anything."""
    if "__enum__" not in found:
        return found
    fqn = str(found.get("fqn"))
    module_name, _, path = fqn.partition(":")
    owner = sys.modules.get(module_name)
    if owner is None:
        _refuse("a pytree enum whose module would be imported", fqn)
    for part in path.split("."):
        owner = inspect.getattr_static(owner, part, None)
    member = found.get("name")
    if not (isinstance(owner, type) and issubclass(owner, enum.Enum)):
        _refuse("a pytree enum that is not an Enum", fqn)
    if not isinstance(member, str) or member not in owner.__members__:
        _refuse("a pytree enum member", f"{fqn}.{member}")
    return found


def _refuse(what: str, text: str) -> Any:
    shown = text if len(text) <= 200 else text[:200] + "..."
    raise CodeRefused(f"{what} {shown!r}")
