"""Tests of bnnify.formats.strict_json: JSON read from files, strictly."""

from __future__ import annotations

import pytest

from bnnify.errors import FormatError
from bnnify.formats.strict_json import MAX_DEPTH, load_json


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_plain_json_is_read():
    assert load_json(b'{"a": [1, 2.5, "x", null, true]}', "f") == {"a": [1, 2.5, "x", None, True]}
    assert load_json(nested(MAX_DEPTH), "f") is not None


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"a": 1, "a": 1}', "'a' appears twice"),
        ('{"x": {"b": 1, "b": 2}}', "'b' appears twice"),
        ('{"a": NaN}', "NaN is not a JSON value"),
        ("[Infinity]", "Infinity is not a JSON value"),
        (nested(MAX_DEPTH + 1), f"nested deeper than {MAX_DEPTH} levels"),
        (nested(100_000), "nested deeper"),
        ("1" * 5000, "not valid JSON"),
        (b'{"a": "\xff"}', "not valid JSON"),
        ("{'a': 1}", "not valid JSON"),
    ],
)
def test_refused_json_names_the_file_and_the_problem(text, match):
    with pytest.raises(FormatError, match=match) as error:
        load_json(text, "f.json", "the index")
    assert error.value.message.startswith("f.json: ")
    assert len(error.value.message) < 300


def test_non_finite_floats_are_written_as_null():
    from bnnify.formats.strict_json import dump_json, finite_json

    value = {"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"), 2)], "c": "NaN"}
    assert finite_json(value) == {"a": None, "b": [1.5, None, [None, 2]], "c": "NaN"}
    text = dump_json(value, sort_keys=True)
    assert "NaN" not in text.replace('"NaN"', "") and "Infinity" not in text
    assert load_json(text, "<test>") == finite_json(value)
