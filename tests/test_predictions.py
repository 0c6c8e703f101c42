"""Tests of bnnify.formats.predictions: the predictions file of `bnnify predict`."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from bnnify.enums import Task
from bnnify.errors import FormatError
from bnnify.formats.predictions import (
    PREDICTIONS_FORMAT,
    Predictions,
    read_predictions,
    write_predictions,
)
from bnnify.formats.safetensors_io import save_file


def example() -> Predictions:
    tensors = {
        "probs": torch.softmax(torch.randn(5, 3, dtype=torch.float64), -1),
        "predicted": torch.tensor([0, 2, 1, 1, 0]),
        "samples": torch.randn(4, 5, 3)[:, :, :2],  # not contiguous: written all the same
    }
    return Predictions(tensors, Task.CLASSIFICATION, 4, "m.fit.safetensors")


def test_round_trip_is_bit_exact(tmp_path):
    original = example()
    write_predictions(original, tmp_path / "p.safetensors")
    again = read_predictions(tmp_path / "p.safetensors")
    assert (again.task, again.samples, again.checkpoint) == (
        Task.CLASSIFICATION,
        4,
        "m.fit.safetensors",
    )
    assert sorted(again.tensors) == sorted(original.tensors)
    for name, tensor in original.tensors.items():
        assert again.tensors[name].dtype == tensor.dtype
        assert torch.equal(again.tensors[name], tensor)


def test_any_safetensors_reader_sees_the_documented_metadata(tmp_path):
    write_predictions(example(), tmp_path / "p.safetensors")
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata == {
        "bnnify.format": PREDICTIONS_FORMAT,
        "bnnify.format_version": "1",
        "bnnify.task": "classification",
        "bnnify.samples": "4",
        "bnnify.checkpoint": "m.fit.safetensors",
    }


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({}, "not a bnnify predictions file"),
        ({"bnnify.format": "bnnify.kl_report"}, "not a bnnify predictions file"),
        (
            {"bnnify.format": PREDICTIONS_FORMAT, "bnnify.format_version": "2"},
            "version '2' is not supported",
        ),
        ({"bnnify.format": PREDICTIONS_FORMAT, "bnnify.format_version": "1"}, "malformed"),
        (
            {
                "bnnify.format": PREDICTIONS_FORMAT,
                "bnnify.format_version": "1",
                "bnnify.task": "ranking",
                "bnnify.samples": "1",
                "bnnify.checkpoint": "c",
            },
            "malformed",
        ),
    ],
)
def test_other_files_are_refused(tmp_path, metadata, match):
    path = tmp_path / "other.safetensors"
    save_file({"mean": torch.zeros(2)}, path, metadata)
    with pytest.raises(FormatError, match=match):
        read_predictions(path)


def test_the_estimator_and_the_call_round_trip(tmp_path):
    predictions = example()
    predictions.estimator = {
        "estimator": "weight_sampling",
        "reason": "the input has shape (5, 2, 3)",
    }
    predictions.call = {"x": "input x", "sr": 16000}
    write_predictions(predictions, tmp_path / "p.safetensors")
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["bnnify.estimator"] == "weight_sampling"
    assert metadata["bnnify.estimator_reason"] == "the input has shape (5, 2, 3)"
    again = read_predictions(tmp_path / "p.safetensors")
    assert again.estimator == predictions.estimator and again.call == predictions.call
