"""Tests of bnnify.formats.model_checks: which model tensors can become Bayesian."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnnify.errors import FormatError, InputError
from bnnify.formats.model_checks import cast_checked, check_module, check_variational, finite_weight


@pytest.mark.parametrize(
    ("dtype", "shape", "target", "match"),
    [
        (torch.float8_e4m3fn, (2,), None, "float8_e4m3fn, a dtype bnnify cannot compute"),
        (torch.float32, (0, 3), None, r"has no elements \(shape \(0, 3\)\)"),
        (torch.float32, (2,), torch.float8_e5m2, "float8_e5m2"),
    ],
)
def test_tensors_that_cannot_become_bayesian(dtype, shape, target, match):
    with pytest.raises(FormatError, match=match) as error:
        check_variational("fc.weight", dtype, shape, "m.pt", target)
    assert "--exclude 'fc.weight'" in error.value.hint


def test_a_float8_tensor_can_be_converted_with_a_wider_dtype():
    check_variational("w", torch.float8_e4m3fn, (2,), "m.pt", torch.float32)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        check_variational("w", dtype, (2, 2), "m.pt", None)


def test_non_finite_weights_and_overflowing_casts():
    with pytest.raises(InputError, match="'w' holds NaN or infinite values"):
        finite_weight(torch.tensor([1.0, float("nan")]), "w", "m.pt")
    with pytest.raises(InputError, match=r"up to 1e\+06, which overflow float16"):
        cast_checked(torch.tensor([1e6, 1.0]), torch.float16, "w", "m.pt")
    mask = torch.tensor([0.0, float("-inf")])  # infinite before: a mask, kept as it is
    assert torch.equal(cast_checked(mask, torch.float16, "mask", "m.pt"), mask.half())
    assert (
        cast_checked(torch.ones(2, dtype=torch.int64), torch.float16, "n", "m.pt").dtype
        == torch.float16
    )


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
def test_module_parameters_follow_the_same_rules():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 0))
    with pytest.raises(FormatError, match=r"'1\.weight' has no elements"):
        check_module(model, None, (), "m.pt")
    check_module(model, None, ("1.*",), "m.pt")
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(InputError, match=r"'0\.weight' holds NaN"):
        check_module(model, None, ("*",), "m.pt")  # excluded, but still a corrupt model
