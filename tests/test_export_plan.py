"""Tests of bnnify.usecases.export_plan: weights, formats, refusals and default names."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from fit_files import shared_fit_files

from bnnify.enums import ExportFormat
from bnnify.errors import InvalidArgumentError, UsageError
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.model_files import ModelFormat
from bnnify.usecases.export_plan import (
    ExportPlan,
    WeightsChoice,
    default_path,
    make_plan,
    require_inputs,
)

SOURCES = list(ModelFormat)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    files = shared_fit_files(tmp_path_factory)
    return Checkpoint(files.reg_fitted), Checkpoint(files.cls_fitted), Checkpoint(files.reg_ckpt)


@pytest.mark.parametrize(
    "text, kind, count",
    [("mean", "mean", 1), ("Sample", "sample", 1), ("ensemble:8", "ensemble", 8)],
)
def test_weights_are_parsed(text, kind, count):
    choice = WeightsChoice.parse(text)
    assert (choice.kind, choice.count) == (kind, count)
    assert WeightsChoice.parse(str(choice)) == choice


@pytest.mark.parametrize(
    "text", ["ensemble", "ensemble:1", "ensemble:0", "ensemble:-2", "means", ""]
)
def test_invalid_weights_list_the_valid_ones(text):
    with pytest.raises(InvalidArgumentError, match="invalid weights") as error:
        WeightsChoice.parse(text)
    assert "ensemble:K" in error.value.hint


@pytest.mark.parametrize(
    "source, expected",
    [
        (ModelFormat.TORCHSCRIPT, ExportFormat.TORCHSCRIPT),
        (ModelFormat.EXPORT, ExportFormat.EXPORT),
        (ModelFormat.STATE_DICT, ExportFormat.STATE_DICT),
        (ModelFormat.SAFETENSORS, ExportFormat.SAFETENSORS),
        (ModelFormat.SHARDED, ExportFormat.SAFETENSORS),
        (ModelFormat.MODULE, ExportFormat.STATE_DICT),
    ],
)
def test_the_default_format_is_the_models_own(fitted, source, expected):
    assert (
        make_plan(fitted[0], source, None, WeightsChoice("mean"), 0, None, False).format is expected
    )
    ensemble = make_plan(fitted[0], source, None, WeightsChoice("ensemble", 3), 0, None, False)
    assert ensemble.format in (ExportFormat.TORCHSCRIPT, ExportFormat.EXPORT)


@pytest.mark.parametrize(
    "source, fmt, weights, message",
    [
        (ModelFormat.STATE_DICT, "state_dict", "ensemble:2", "an ensemble cannot be written"),
        (ModelFormat.TORCHSCRIPT, "safetensors", "ensemble:2", "an ensemble cannot be written"),
        (ModelFormat.TORCHSCRIPT, "export", "mean", "cannot become a torch"),
        (ModelFormat.EXPORT, "torchscript", "sample", "cannot become TorchScript"),
    ],
)
def test_formats_that_cannot_hold_what_was_asked_are_refused(fitted, source, fmt, weights, message):
    with pytest.raises(UsageError, match=message) as error:
        make_plan(fitted[0], source, fmt, WeightsChoice.parse(weights), 0, None, False)
    assert error.value.hint


def test_an_unknown_format_lists_the_valid_ones(fitted):
    with pytest.raises(InvalidArgumentError, match="torchscript"):
        make_plan(fitted[0], ModelFormat.TORCHSCRIPT, "onnx", WeightsChoice("mean"), 0, None, False)


def test_a_classifier_ensemble_averages_probabilities(fitted):
    reg, cls, _ = fitted
    ensemble = WeightsChoice("ensemble", 2)
    assert make_plan(cls, ModelFormat.EXPORT, None, ensemble, 0, None, False).softmax
    assert not make_plan(reg, ModelFormat.EXPORT, None, ensemble, 0, None, False).softmax
    assert make_plan(reg, ModelFormat.EXPORT, None, ensemble, 0, "classification", False).softmax


def test_aleatoric_needs_a_fitted_regression_ensemble(fitted):
    reg, cls, unfitted = fitted
    ensemble = WeightsChoice("ensemble", 2)
    plan = make_plan(reg, ModelFormat.TORCHSCRIPT, None, ensemble, 0, None, True)
    assert plan.noise > 0
    for ckpt, weights in ((reg, WeightsChoice("mean")), (cls, ensemble), (unfitted, ensemble)):
        with pytest.raises(UsageError, match="aleatoric applies"):
            make_plan(ckpt, ModelFormat.TORCHSCRIPT, None, weights, 0, None, True)


@pytest.mark.parametrize(
    "source, fmt, weights, needed",
    [
        (ModelFormat.EXPORT, ExportFormat.EXPORT, "mean", False),  # its own graph
        (ModelFormat.EXPORT, ExportFormat.EXPORT, "ensemble:2", True),
        (ModelFormat.STATE_DICT, ExportFormat.EXPORT, "mean", True),
        (ModelFormat.TORCHSCRIPT, ExportFormat.TORCHSCRIPT, "mean", True),  # the reach check
        (ModelFormat.TORCHSCRIPT, ExportFormat.STATE_DICT, "sample", False),
        (ModelFormat.STATE_DICT, ExportFormat.TORCHSCRIPT, "ensemble:2", False),
    ],
)
def test_inputs_are_required_where_tracing_or_checking_needs_them(source, fmt, weights, needed):
    plan = ExportPlan(fmt, WeightsChoice.parse(weights))
    require_inputs(source, plan, True)
    if needed:
        with pytest.raises(UsageError, match="needs example inputs") as error:
            require_inputs(source, plan, False)
        assert "--input" in error.value.hint
    else:
        require_inputs(source, plan, False)


def test_default_names_never_collide():
    checkpoint = Path("out/model.bnn.fit.safetensors")
    weights = [WeightsChoice("mean"), WeightsChoice("sample"), WeightsChoice("ensemble", 4)]
    names = set()
    for fmt, choice, seed in itertools.product(ExportFormat, weights, (0, 1)):
        path = default_path(checkpoint, ExportPlan(fmt, choice, seed))
        assert path.parent == checkpoint.parent and path != checkpoint
        names.add((path.name, choice.kind == "mean"))
    assert len(names) == 4 * (1 + 2 + 2)  # the means do not depend on the seed
    mean = default_path(checkpoint, ExportPlan(ExportFormat.EXPORT, weights[0]))
    assert mean.name == "model.bnn.fit.mean.pt2"
    index = default_path(
        Path("m.bnn.safetensors.index.json"), ExportPlan(ExportFormat.SAFETENSORS, weights[2], 7)
    )
    assert index.name == "m.bnn.ensemble4-seed7.safetensors"
