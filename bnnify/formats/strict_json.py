"""JSON read from files: UTF-8, no duplicate keys, no NaN, bounded in size and nesting."""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from bnnify.errors import FormatError, shorten

__all__ = ["MAX_DEPTH", "finite_json", "load_json"]

# bnnify's own JSON (index files, checkpoint metadata) nests a handful of levels.
MAX_DEPTH = 64


class _Refused(ValueError):
    """A problem found while parsing, reported with the file name by `load_json`."""


def load_json(data: bytes | str, source: str, what: str = "the file") -> Any:
    """Parses JSON text strictly.

    Refused: text that is not UTF-8, invalid JSON, `NaN` and `Infinity`, an object with
    a key twice (readers disagree on which value wins), and nesting deeper than
    `MAX_DEPTH` (which would otherwise end in a `RecursionError` here or downstream).

    Args:
        data: The JSON text.
        source: The file it comes from, for messages.
        what: What the text is, for messages (such as "the index" or "metadata 'x'").

    Raises:
        FormatError: The text is refused; the message says why.

    Example:
        >>> load_json('{"a": [1, 2]}', "x.json")
        {'a': [1, 2]}
        >>> load_json('{"a": 1, "a": 2}', "x.json")
        Traceback (most recent call last):
        ...
        bnnify.errors.FormatError: x.json: the file is not valid JSON (key 'a' appears twice)
    """
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        value = json.loads(text, object_pairs_hook=_unique, parse_constant=_no_constant)
    except RecursionError:
        raise _too_deep(source, what) from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, _Refused, huge integers
        reason = str(error) if isinstance(error, _Refused) else shorten(str(error), 160)
        raise FormatError(f"{source}: {what} is not valid JSON ({reason})") from None
    if _depth_exceeds(value, MAX_DEPTH):
        raise _too_deep(source, what)
    return value


def finite_json(value: Any) -> Any:
    """`value` with every float that is not finite replaced by None (JSON has no NaN).

    Example:
        >>> finite_json({"a": [1.0, float("nan")], "b": float("inf")})
        {'a': [1.0, None], 'b': None}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        counts = Counter(key for key, _ in pairs)
        repeated = next(key for key, count in counts.items() if count > 1)
        raise _Refused(f"key {shorten(repeated)} appears twice")
    return result


def _no_constant(name: str) -> None:
    raise _Refused(f"{name} is not a JSON value")


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _too_deep(source: str, what: str) -> FormatError:
    return FormatError(
        f"{source}: {what} is nested deeper than {MAX_DEPTH} levels",
        hint="The file is corrupt or was not written by the tool it claims to come from.",
    )
