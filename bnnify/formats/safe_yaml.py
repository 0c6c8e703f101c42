"""A strict, safe YAML loader: plain data only, duplicate keys and hostile nesting refused."""

from __future__ import annotations

import re
from typing import Any, NoReturn

import yaml

from bnnify.errors import SpecError, clip, shorten

__all__ = ["MAX_CHARS", "MAX_DEPTH", "decode_utf8", "load_yaml"]

# A spec is a few hundred bytes; these bounds keep hostile documents cheap to refuse.
MAX_CHARS = 1 << 20
MAX_DEPTH = 50


def _fail(source: str, problem: str, hint: str | None = None) -> NoReturn:
    raise SpecError(f"{source}: {problem}", hint=hint)


class _Loader(yaml.SafeLoader):
    """`SafeLoader` that refuses duplicate keys, recursive aliases and deep nesting.

    PyYAML composes nodes recursively: the depth bound turns a document nested
    thousands of levels deep into a `SpecError` instead of a `RecursionError`.
    """

    def __init__(self, stream: str, source: str):
        super().__init__(stream)
        self.source = source
        self.depth = 0
        self.open_anchors: set[str] = set()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1
        is_alias = isinstance(event, yaml.AliasEvent)
        if is_alias and event.anchor in self.open_anchors:
            _fail(self.source, f"line {line}: recursive alias *{event.anchor} is not allowed")
        if self.depth >= MAX_DEPTH:
            _fail(self.source, f"line {line}: nested deeper than {MAX_DEPTH} levels")
        anchor = None if is_alias else event.anchor
        if anchor is not None:
            self.open_anchors.add(anchor)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1
            self.open_anchors.discard(anchor)

    def compose_mapping_node(self, anchor: Any) -> Any:
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            # Keys brought in by a merge (`<<: *base`) may be overridden; written keys may not.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
            if key in seen:
                _fail(
                    self.source,
                    f"duplicate key {key_node.value!r} on line {line} (first on line {seen[key]})",
                    hint="Each key may appear once per mapping; remove one of them.",
                )
            seen[key] = line
        return node

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as error:
            # Tagged scalars (`2020-13-45` is a date, `!!int abc`) fail in PyYAML's constructors.
            if isinstance(error, SpecError):
                raise
            value = node.value if isinstance(node, yaml.ScalarNode) else node.tag
            problem = (
                f"cannot read {shorten(value)} as {node.tag.rpartition(':')[2]}: {clip(str(error))}"
            )
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


# PyYAML reads `1e-3` as a string (YAML 1.1 wants a dot); a spec means a number, as in YAML 1.2.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def decode_utf8(raw: bytes, source: str = "<bytes>") -> str:
    """Decodes UTF-8 text (a leading byte-order mark is dropped).

    Raises:
        ValueError: (`SpecError`) Naming the first invalid byte, its line and column.
    """
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line, column = _line_column(raw, error.start, b"\n")
        _fail(
            source,
            f"not UTF-8 text: invalid byte 0x{raw[error.start]:02x} at line {line}, "
            f"column {column}",
            hint="Save the file as UTF-8 text.",
        )


def _line_column(text: Any, position: int, newline: Any) -> tuple[int, int]:
    line = text.count(newline, 0, position) + 1
    return line, position - (text.rfind(newline, 0, position) + 1) + 1


def load_yaml(text: str, source: str = "<string>") -> Any:
    """Loads one YAML document as plain data (never constructs Python objects).

    Numbers such as `1e-3` are read as floats (YAML 1.2) rather than strings.

    Args:
        text: The YAML source (bytes are decoded as UTF-8).
        source: The file name used in error messages.

    Raises:
        ValueError: (`SpecError`) For syntax errors (with line and column), duplicate
            keys, tags naming Python objects, recursive aliases, nesting deeper than
            `MAX_DEPTH` or text longer than `MAX_CHARS`.

    Example:
        >>> load_yaml("prior: {name: gaussian, kwargs: {sigma: 1e-2}}")
        {'prior': {'name': 'gaussian', 'kwargs': {'sigma': 0.01}}}
    """
    if isinstance(text, (bytes, bytearray)):
        text = decode_utf8(bytes(text), source)
    if not isinstance(text, str):
        _fail(source, f"expected YAML text, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        _fail(source, f"{len(text)} characters is too large (at most {MAX_CHARS})")
    loader = None
    try:
        loader = _Loader(text, source)
        return loader.get_single_data()
    except SpecError:
        raise
    except yaml.MarkedYAMLError as error:
        _fail(source, f"invalid YAML {_describe(error)}", hint=_hint(error))
    except yaml.YAMLError as error:
        position = getattr(error, "position", None)
        if position is None:
            _fail(source, f"invalid YAML: {error}")
        line, column = _line_column(text, position, "\n")
        reason = getattr(error, "reason", "unreadable text")
        _fail(source, f"invalid YAML at line {line}, column {column}: {reason}")
    finally:
        if loader is not None:
            loader.dispose()


def _describe(error: yaml.MarkedYAMLError) -> str:
    problem, context = error.problem_mark, error.context_mark
    mark = problem or context
    where = f"at line {mark.line + 1}, column {mark.column + 1}: " if mark else ": "
    if error.context and context and problem and context.line != problem.line:
        where += f"{error.context} (line {context.line + 1}, column {context.column + 1}) "
    elif error.context:
        where += f"{error.context} "
    return where + str(error.problem or "")


def _hint(error: yaml.MarkedYAMLError) -> str | None:
    if "constructor for the tag" in str(error.problem):
        return "Only plain data is accepted: tags that build Python objects are refused."
    return None
