"""Tests of bnnify.formats.model_inputs: named per-example tensors, sliced together."""

from __future__ import annotations

import math

import pytest
import torch

from bnnify.errors import InputError, InvalidArgumentError
from bnnify.formats.model_inputs import Inputs, as_inputs, parse_input_keys


def test_every_input_is_sliced_along_the_examples():
    x, mask = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    inputs = Inputs({"x": x, "mask": mask})
    assert len(inputs) == 6 and inputs.names == ["x", "mask"]
    part = inputs[2:5]
    assert torch.equal(part.tensors["x"], x[2:5]) and torch.equal(part.tensors["mask"], mask[2:5])
    index = torch.tensor([5, 0])
    picked = inputs[index]
    assert torch.equal(picked.tensors["x"], x[index]) and picked.names == ["x", "mask"]
    assert inputs.shapes(per_example=True) == "x (2,), mask ()"
    assert inputs.largest() == 11.0
    assert as_inputs(inputs) is inputs
    assert as_inputs(x).names == ["x"] and torch.equal(as_inputs(x).tensors["x"], x)
    assert math.isnan(Inputs({"ids": mask}).largest())  # no floating-point input


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({}, "no input tensor"),
        ({"x": torch.zeros(3, 2), "mask": torch.zeros(4)}, r"different numbers of examples: x"),
        ({"x": torch.zeros(3), "sr": torch.tensor(16000)}, r"input 'sr' is a single number"),
        ({"x": [1, 2]}, "input 'x' is a list, not a tensor"),
    ],
)
def test_inputs_that_cannot_be_batched_are_refused(tensors, message):
    with pytest.raises(InputError, match=message):
        Inputs(tensors)


def test_input_keys_name_the_argument_and_the_tensor():
    assert parse_input_keys("x") == [("x", "x")]
    assert parse_input_keys(["x=feats", " mask "]) == [("x", "feats"), ("mask", "mask")]
    for bad, message in (([], "no input key"), (["x", "x=y"], "given twice"), (["=y"], "names no")):
        with pytest.raises(InvalidArgumentError, match=message):
            parse_input_keys(bad)
