"""Tests of bnnify.formats.arch: building a spec's `arch`, loading a state dict into it strictly."""

from __future__ import annotations

import shlex

import pytest
import torch
from torch import nn

from bnnify.demo import build_model
from bnnify.errors import FormatError, SpecError, UnsafeInputError, UsageError
from bnnify.formats.arch import arch_flags, build_arch, confirm_arch, load_strict


def test_build_arch_calls_the_named_function_with_its_kwargs():
    module = build_arch("bnnify.demo:build_model", {"in_features": 3, "hidden": 5})
    assert isinstance(module, nn.Sequential)
    assert module[0].weight.shape == (5, 3)
    assert isinstance(
        build_arch("torch.nn:Linear", {"in_features": 2, "out_features": 1}), nn.Linear
    )
    # Dotted attributes reach nested callables.
    assert isinstance(build_arch("torch:nn.Identity"), nn.Identity)


@pytest.mark.parametrize(
    ("arch", "kwargs", "match"),
    [
        ("bnnify.demo.build_model", None, "not of the form 'package.module:callable'"),
        (":build_model", None, "not of the form"),
        ("bnnify_missing_package.models:build", None, "cannot import module"),
        ("bnnify.demo:no_such_function", None, "has no attribute 'no_such_function'"),
        ("bnnify.demo:__doc__", None, "is not callable"),
        ("bnnify.demo:build_model", {"unknown": 1}, "failed with arch_kwargs {'unknown': 1}"),
        ("bnnify.demo:synthetic_regression", {"n": 2}, "returned tuple, not an nn.Module"),
    ],
)
def test_build_arch_errors_are_spec_errors(arch, kwargs, match):
    with pytest.raises(SpecError, match=match) as error:
        build_arch(arch, kwargs)
    assert error.value.exit_code == 2


def test_load_strict_loads_a_matching_state_dict():
    torch.manual_seed(1)
    source = build_model()
    target = build_model()
    load_strict(target, source.state_dict(), "bnnify.demo:build_model")
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor)


def test_load_strict_lists_what_does_not_match():
    state = build_model().state_dict()
    del state["0.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["3.weight"] = torch.zeros(2, 32)
    target = build_model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(FormatError) as error:
        load_strict(target, state, "bnnify.demo:build_model")
    message = str(error.value)
    assert "missing: 0.bias" in message
    assert "unexpected: extra.weight" in message
    assert "3.weight: file (2, 32) vs arch (1, 32)" in message
    assert "arch_kwargs" in error.value.hint
    # Nothing was loaded.
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key])


def test_load_strict_abbreviates_long_lists():
    with pytest.raises(FormatError, match=r"missing: .*\(\+4 more\)"):
        load_strict(build_model(), {}, "bnnify.demo:build_model")


@pytest.mark.parametrize(
    ("arch", "kwargs", "match"),
    [
        (None, None, "a file alone cannot authorize"),
        ("os:system", '{"hidden": 32}', "but --arch confirms 'os:system'"),
        ("m:build", None, "which --arch-kwargs must repeat"),
        ("m:build", '{"hidden": 64}', 'gives {"hidden": 64}'),
        ("m:build", '{"hidden": 32.0}', 'gives {"hidden": 32.0}'),
        ("m:build", '{"hidden": true}', 'gives {"hidden": true}'),
        ("m:build", '{"hidden": 32, "x": 1}', "gives"),
    ],
)
def test_an_arch_runs_only_as_confirmed(arch, kwargs, match):
    with pytest.raises(UnsafeInputError, match=match) as error:
        confirm_arch("m:build", {"hidden": 32}, arch, kwargs, where="spec.yaml")
    assert error.value.exit_code == 3
    assert error.value.hint.endswith("""--arch m:build --arch-kwargs '{"hidden": 32}'""")


def test_the_confirmation_printed_in_the_hint_confirms():
    kwargs = {"command": "echo 'it''s'", "n": [1, {"b": None}]}
    flags = shlex.split(arch_flags("os:system", kwargs))
    assert flags[:2] == ["--arch", "os:system"] and flags[2] == "--arch-kwargs"
    confirm_arch("os:system", kwargs, flags[1], flags[3], where="x")
    confirm_arch("os:system", kwargs, "os:system", dict(reversed(kwargs.items())), where="x")
    confirm_arch("m:build", {}, "m:build", None, where="x")  # nothing to repeat


@pytest.mark.parametrize("kwargs", ["[1]", "{not json", '"text"'])
def test_arch_kwargs_must_be_a_json_object(kwargs):
    with pytest.raises(UsageError, match="--arch-kwargs"):
        confirm_arch("m:build", {}, "m:build", kwargs, where="x")
