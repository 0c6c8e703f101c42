"""The layers of the package import only downward, and its modules stay short.

core `bnn/` (torch only) -> files and formats `formats/` -> use cases `usecases/`
(and their facade `api.py`) -> `cli/` (the only place importing Typer and Rich).
`errors`, `enums` and `catalog` are shared by every layer and import no third party.
Imports are read from the source with `ast`, those inside functions included.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bnnify"
SHARED = {"bnnify", "bnnify.errors", "bnnify.enums", "bnnify.catalog"}
LAYERS = ["core", "formats", "usecases", "cli"]
# Third-party packages each layer may import (the standard library is always allowed).
THIRD_PARTY = {
    "shared": set(),
    "core": {"torch"},
    # sympy: the .pt2 guard checks the shape expressions torch's loader sympifies (sympy
    # comes with torch).
    "formats": {"torch", "safetensors", "yaml", "sympy"},
    "usecases": {"torch", "safetensors"},
    "cli": {"torch", "typer", "rich"},
}
# Optional packages a layer may import only inside a function, so that the package
# imports without them (matplotlib: the `plot` extra, for formats/plots.py).
LAZY_THIRD_PARTY = {"formats": {"matplotlib"}}
API_NAMES = {"convert", "fit", "predict", "kl", "inspect", "api"}
MAX_LINES = 400
MAX_COMMAND_LINES = 100
# Modules over the limit, with their ceiling so that they cannot grow meanwhile (none).
OVERSIZED: dict[str, int] = {}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def layer(module: str) -> str:
    if module in SHARED:
        return "shared"
    if module.startswith("bnnify.bnn"):
        return "core"
    if module.startswith("bnnify.formats"):
        return "formats"
    if module.startswith(("bnnify.usecases", "bnnify.api", "bnnify.demo")):
        return "usecases"
    if module.startswith(("bnnify.cli", "bnnify.__main__")):
        return "cli"
    raise AssertionError(f"{module} belongs to no layer: add it to test_layers.py")


def imports(path: Path, *, top_level: bool = False) -> list[tuple[int, str]]:
    """Every module `path` imports (absolute names), with the line; or only at top level."""
    found = []
    tree = ast.parse(path.read_text())
    nodes = _outside_functions(tree) if top_level else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: use absolute imports"
            base = node.module or ""
            found.append((node.lineno, base))
            if base == "bnnify":  # `from bnnify import errors` imports bnnify.errors
                found += [(node.lineno, f"bnnify.{alias.name}") for alias in node.names]
    return found


def _outside_functions(node: ast.AST) -> list[ast.AST]:
    """`node` and its descendants, except the bodies of functions."""
    found = [node]
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            found += _outside_functions(child)
    return found


def allowed(importer: str, imported: str) -> bool:
    """Whether a module of layer `importer` may import bnnify module `imported`."""
    target = layer(imported)
    if importer == "shared":
        return target == "shared"
    if imported == "bnnify.catalog":
        return importer == "cli"
    return target == "shared" or LAYERS.index(target) <= LAYERS.index(importer)


def known_module(name: str) -> str:
    """The bnnify module a dotted name refers to (`bnnify.bnn.kl_training.CHUNK` -> module)."""
    names = modules()
    while name not in names and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


MODULES = modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_downward(module):
    own = layer(module)
    wrong = []
    eager = {name.partition(".")[0] for _, name in imports(MODULES[module], top_level=True)}
    for line, name in imports(MODULES[module]):
        top = name.partition(".")[0]
        if top == "bnnify":
            target = known_module(name)
            if module == "bnnify" and target == "bnnify.api":
                continue  # the package's lazy facade (module `__getattr__`)
            if not allowed(own, target):
                wrong.append(f"line {line}: {own} imports {target} ({layer(target)})")
        elif top in LAZY_THIRD_PARTY.get(own, ()):
            if top in eager:
                wrong.append(f"line {line}: {own} imports {top!r} at import time, not lazily")
        elif top not in sys.stdlib_module_names and top not in THIRD_PARTY[own]:
            wrong.append(f"line {line}: {own} imports the third-party package {top!r}")
    assert not wrong, f"{MODULES[module]}: " + "; ".join(wrong)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) in ("core", "formats")))
def test_lower_layers_do_not_reach_the_api_through_the_package(module):
    """`import bnnify; bnnify.convert(...)` would be an upward import in disguise."""
    tree = ast.parse(MODULES[module].read_text())
    reached = [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "bnnify"
        and node.attr in API_NAMES
    ]
    assert not reached, f"{module} uses bnnify.{reached[0]}"


def test_the_package_imports_its_api_lazily():
    tree = ast.parse(MODULES["bnnify"].read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(n.module == "__future__" or n.module == "typing" for n in top_level)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_short(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= OVERSIZED.get(module, MAX_LINES), f"{module}: {lines} lines"


def command_modules() -> list[str]:
    """The cli modules defining a `@command` function."""
    found = []
    for module in sorted(m for m in MODULES if layer(m) == "cli"):
        tree = ast.parse(MODULES[module].read_text())
        decorated = [
            d
            for node in tree.body
            if isinstance(node, ast.FunctionDef)
            for d in node.decorator_list
            if isinstance(d, ast.Name) and d.id == "command"
        ]
        if decorated:
            found.append(module)
    return found


def test_every_command_has_a_thin_module():
    commands = command_modules()
    assert len(commands) == 11, commands
    for module in commands:
        lines = len(MODULES[module].read_text().splitlines())
        assert lines <= MAX_COMMAND_LINES, f"{module}: {lines} lines"


def test_the_checks_catch_what_they_are_for():
    assert not allowed("core", "bnnify.formats.checkpoint")
    assert not allowed("formats", "bnnify.usecases.convert")
    assert not allowed("usecases", "bnnify.cli.output")
    assert not allowed("shared", "bnnify.bnn")
    assert not allowed("core", "bnnify.catalog")
    assert allowed("cli", "bnnify.catalog") and allowed("core", "bnnify.errors")
    assert allowed("usecases", "bnnify.bnn.keys") and allowed("formats", "bnnify")
    assert known_module("bnnify.bnn.kl_training.CHUNK") == "bnnify.bnn.kl_training"
    lazy = ast.parse("import os\ndef f():\n    import matplotlib\n")
    assert [type(n).__name__ for n in _outside_functions(lazy) if isinstance(n, ast.Import)] == [
        "Import"
    ]
