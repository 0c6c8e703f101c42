"""Tests of the calibration record of a checkpoint (`bnnify.formats.calibration`)."""

from __future__ import annotations

import json

import pytest
from fit_files import shared_fit_files

from bnnify.enums import Task
from bnnify.errors import FormatError
from bnnify.formats.calibration import CALIBRATION_KEY, read_calibration
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.checkpoint_writer import copy_checkpoint

GOOD = {
    "task": "regression",
    "parameter": "scale",
    "bayesian": {"scale": 1.5},
    "mean_weights": {"scale": 0.5},
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return Checkpoint(shared_fit_files(tmp_path_factory).reg_fitted)


def _with(source, tmp_path, record, name="c.safetensors"):
    path = tmp_path / name
    metadata = dict(source.metadata)
    if record is not None:
        metadata[CALIBRATION_KEY] = record if isinstance(record, str) else json.dumps(record)
    copy_checkpoint(source, path, metadata)
    return Checkpoint(path)


def test_a_record_reads_back_per_model(source, tmp_path):
    calibration = read_calibration(_with(source, tmp_path, GOOD))
    assert calibration.task is Task.REGRESSION and calibration.parameter == "scale"
    assert (calibration.value(), calibration.value(mean_weights=True)) == (1.5, 0.5)
    assert json.loads(calibration.to_metadata()) == GOOD
    assert read_calibration(_with(source, tmp_path, None, "plain.safetensors")) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": "ranking"}, "task 'ranking'"),
        ({"parameter": "temperature"}, "parameter 'temperature'"),
        ({"mean_weights": {}}, "no scale for the mean weights model"),
        ({"bayesian": {"scale": -1.0}}, "-1.0 is not a positive number"),
        ({"bayesian": {"scale": True}}, "no scale for the bayesian model"),
    ],
)
def test_malformed_records_are_refused(source, tmp_path, change, message):
    with pytest.raises(FormatError, match="malformed calibration") as error:
        read_calibration(_with(source, tmp_path, {**GOOD, **change}))
    assert message in str(error.value)
    with pytest.raises(FormatError, match="not valid JSON"):
        read_calibration(_with(source, tmp_path, '{"task": NaN}', "nan.safetensors"))
