"""Tests of bnnify.enums: the same words in Python, in specs, in JSON and on the command line."""

from __future__ import annotations

import json

import pytest

from bnnify.enums import KLMethod, Reduction, Task
from bnnify.errors import InvalidArgumentError


@pytest.mark.parametrize("member", [*Task, *Reduction, *KLMethod])
def test_members_are_their_words(member):
    assert member == member.value and isinstance(member, str)
    assert str(member) == f"{member}" == member.value
    assert json.dumps({"k": member}) == json.dumps({"k": member.value})
    assert type(member)(member.value) is member


def test_the_words():
    assert [t.value for t in Task] == ["regression", "classification"]
    assert [r.value for r in Reduction] == ["sum", "mean"]
    assert [m.value for m in KLMethod] == ["analytic", "monte_carlo"]
    with pytest.raises(ValueError):
        Task("ranking")


def test_parse_takes_any_case_and_refuses_other_words():
    assert Task.parse("Regression") is Task.REGRESSION
    assert Reduction.parse(Reduction.MEAN) is Reduction.MEAN
    with pytest.raises(InvalidArgumentError, match=r"invalid task 'regresion'\. Did you") as error:
        Task.parse("regresion")
    assert error.value.hint == "Choose one of: regression, classification."
    with pytest.raises(InvalidArgumentError, match="invalid reduction 3"):
        Reduction.parse(3)
