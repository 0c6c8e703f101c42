"""Tests of bnnify.formats.safe_yaml: plain data only, every hostile document refused."""

from __future__ import annotations

import pytest

from bnnify.errors import SpecError
from bnnify.formats.safe_yaml import MAX_CHARS, MAX_DEPTH, decode_utf8, load_yaml


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("a: 1\nb: [x, 2.5, null, true]", {"a": 1, "b": ["x", 2.5, None, True]}),
        ("sigma: 1e-3", {"sigma": 0.001}),  # a number, as in YAML 1.2 (PyYAML: a string)
        ("sigma: 1.5E+2", {"sigma": 150.0}),
        ("tag: '1e5'", {"tag": "1e5"}),
        ("base: &b {x: 1}\nother:\n  <<: *b\n  x: 2", {"base": {"x": 1}, "other": {"x": 2}}),
        ("", None),
    ],
)
def test_plain_data_loads(text, value):
    assert load_yaml(text) == value


def test_bytes_are_utf8_and_a_byte_order_mark_is_dropped():
    assert load_yaml("\ufeffname: é".encode()) == {"name": "é"}
    with pytest.raises(SpecError, match=r"invalid byte 0xff at line 2, column 3"):
        decode_utf8(b"a: 1\nb:\xff", "spec.yaml")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a: 1\na: 2", "duplicate key 'a' on line 2 \\(first on line 1\\)"),
        ("x: !!python/object/apply:os.system ['true']", "could not determine a constructor"),
        ("a: &x [*x]", "recursive alias"),
        ("a: [1, 2", "invalid YAML"),
        ("d: 2020-13-45", "cannot read '2020-13-45'"),
        ("i: !!int abc", "cannot read 'abc' as int"),
    ],
)
def test_refusals_say_where_and_why(text, match):
    with pytest.raises(SpecError, match=match):
        load_yaml(text, "spec.yaml")


def test_tags_naming_python_objects_get_a_hint():
    with pytest.raises(SpecError) as error:
        load_yaml("x: !!python/name:os.system ''")
    assert error.value.hint and "plain data" in error.value.hint


def test_nesting_and_size_are_bounded():
    deep = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    with pytest.raises(SpecError, match=f"nested deeper than {MAX_DEPTH} levels"):
        load_yaml(deep)
    assert load_yaml("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)) is not None
    with pytest.raises(SpecError, match="too large"):
        load_yaml("a" * (MAX_CHARS + 1))


def test_only_text_is_accepted():
    with pytest.raises(SpecError, match="expected YAML text, got int"):
        load_yaml(3)
