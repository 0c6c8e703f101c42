"""Tests of `bnnify.calibrate` and of `predict` applying what it fits."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from fit_files import blobs, shared_fit_files, single_thread, toy_regression
from safetensors import safe_open
from safetensors.torch import save_file

import bnnify
from bnnify.errors import InputError, OutputExistsError, UsageError
from bnnify.formats.calibration import CALIBRATION_KEY, read_calibration
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.predictions import read_predictions

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return shared_fit_files(tmp_path_factory)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Held-out data of both tasks, drawn apart from the training data."""
    folder = tmp_path_factory.mktemp("held_out")
    x, labels = blobs(40, seed=11)
    # Labels flipped at random: the network is over-confident on these, T > 1.
    flip = torch.rand(len(labels), generator=torch.Generator().manual_seed(3)) < 0.2
    labels = torch.where(flip, (labels + 1) % 3, labels)
    save_file({"x": x, "y": labels}, str(folder / "blobs.val.safetensors"))
    xr, yr = toy_regression(120, seed=12)
    save_file({"x": xr, "y": yr}, str(folder / "toy.val.safetensors"))
    return folder


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with single_thread():
        yield


def _calibrate(files, held_out, tmp_path, task="classification", **options):
    if task == "classification":
        ckpt, model, data = files.cls_fitted, files.cls_model, held_out / "blobs.val.safetensors"
    else:
        ckpt, model, data = files.reg_fitted, files.reg_model, held_out / "toy.val.safetensors"
    out = tmp_path / f"{task}.cal.safetensors"
    result = bnnify.calibrate(ckpt, model, data, samples=8, output=out, **options)
    return result, ckpt, model, data


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_predict_reproduces_the_calibrated_metrics(files, held_out, tmp_path, task):
    result, _, model, data = _calibrate(files, held_out, tmp_path, task)
    record = result.calibration.record
    calibrated = bnnify.predict(result.output, model, data, targets=data, samples=8)
    raw = bnnify.predict(result.output, model, data, targets=data, samples=8, calibration=False)
    for name in ("bayesian", "mean_weights"):
        for key in ("nll", "ece", "brier", "coverage_90", "crps"):
            if key in record[name]["after"]:
                after, before = record[name]["after"][key], record[name]["before"][key]
                assert calibrated.metrics[name][key] == pytest.approx(after, rel=1e-6, abs=1e-9)
                assert raw.metrics[name][key] == pytest.approx(before, rel=1e-6, abs=1e-9)
        assert record[name]["after"]["nll"] <= record[name]["before"]["nll"]
    applied = calibrated.summary["calibration"]
    assert applied["applied"] and applied["value"] == record["bayesian"][record["parameter"]]
    assert raw.summary["calibration"] == {"applied": False, "reason": "ignored on request"}
    assert calibrated.to_json()["summary"]["calibration"]["applied"]


def test_over_confident_classifier_gets_a_temperature_above_one(files, held_out, tmp_path):
    result, *_ = _calibrate(files, held_out, tmp_path)
    record = result.calibration.record
    assert record["parameter"] == "temperature" and record["task"] == "classification"
    assert record["bayesian"]["temperature"] > 1 and not record["bayesian"]["at_bound"]
    assert record["data"]["examples"] == 120 and record["data"]["sha256"]
    assert (record["samples"], record["seed"]) == (8, 0)
    assert result.to_json()["schema"] == "bnnify.calibrate/1"
    assert next(iter(result.to_json())) == "schema"


def test_the_calibrated_copy_keeps_every_tensor_and_adds_the_record(files, held_out, tmp_path):
    result, ckpt, *_ = _calibrate(files, held_out, tmp_path)
    with safe_open(ckpt, "pt") as source, safe_open(result.output, "pt") as copy:
        keys = source.keys()
        assert sorted(keys) == sorted(copy.keys())
        for key in keys:
            assert torch.equal(source.get_tensor(key), copy.get_tensor(key))
        before, after = source.metadata(), copy.metadata()
    assert {k: v for k, v in after.items() if k != CALIBRATION_KEY} == before
    assert json.loads(after[CALIBRATION_KEY]) == result.calibration.record
    read = read_calibration(Checkpoint(result.output))
    assert read.values == result.calibration.values


def test_predictions_file_records_the_calibration_and_the_targets(files, held_out, tmp_path):
    result, _, model, data = _calibrate(files, held_out, tmp_path, "regression")
    out = tmp_path / "p.safetensors"
    bnnify.predict(result.output, model, data, targets=data, samples=8, output=out)
    written = read_predictions(out)
    scale = result.calibration.values["bayesian"]
    assert written.calibration == {"scale": scale, "model": "bayesian"}
    assert "targets" in written.tensors
    # The written spread is the calibrated one: the aleatoric part is s * noise.
    raw = bnnify.predict(result.output, model, data, samples=8, calibration=False)
    expected = scale * raw.tensors["aleatoric_std"]
    assert torch.allclose(written.tensors["aleatoric_std"], expected)


def test_outputs_are_exclusive_and_never_an_input(files, held_out, tmp_path):
    result, ckpt, model, data = _calibrate(files, held_out, tmp_path)
    with pytest.raises(OutputExistsError):
        bnnify.calibrate(ckpt, model, data, samples=2, output=result.output)
    bnnify.calibrate(ckpt, model, data, samples=2, output=result.output, force=True)
    with pytest.raises(UsageError, match="input"):
        bnnify.calibrate(ckpt, model, data, samples=2, output=ckpt, force=True)


def test_default_output_is_beside_the_checkpoint(files, held_out, tmp_path):
    ckpt = tmp_path / "m.fit.safetensors"
    ckpt.write_bytes(files.cls_fitted.read_bytes())
    data = held_out / "blobs.val.safetensors"
    result = bnnify.calibrate(ckpt, files.cls_model, data, samples=2)
    assert result.output == tmp_path / "m.fit.cal.safetensors" and result.output.exists()


def test_unfitted_regression_and_a_task_mismatch_are_refused(files, held_out, tmp_path):
    data = held_out / "toy.val.safetensors"
    with pytest.raises(UsageError, match="never fitted"):
        bnnify.calibrate(files.reg_ckpt, files.reg_model, data, task="regression", samples=2)
    result, _, model, cls_data = _calibrate(files, held_out, tmp_path)
    with pytest.raises(UsageError, match="calibrated for classification"):
        bnnify.predict(result.output, model, cls_data, task="regression", samples=2)
    with pytest.raises(UsageError, match="out-of-distribution"):
        bnnify.predict(files.reg_fitted, files.reg_model, data, ood=data, samples=2)


def test_calibrating_on_the_training_data_is_warned_about(files, held_out, tmp_path, caplog):
    train = held_out / "blobs.val.safetensors"  # labels with mistakes: a temperature fits
    fitted = tmp_path / "m.fit.safetensors"
    options = dict(task="classification", epochs=1, output=fitted)
    bnnify.fit(files.cls_ckpt, files.cls_model, train, **options)
    with caplog.at_level(logging.WARNING, logger="bnnify"):
        result = bnnify.calibrate(fitted, files.cls_model, train, samples=2)
    assert "the data the posterior was fitted on" in caplog.text
    assert result.calibration.record["data"]["fit_data"] is True


def test_ood_inputs_are_scored_by_each_model(files, tmp_path):
    far = torch.randn(30, 2, generator=torch.Generator().manual_seed(0)) + 12
    result = bnnify.predict(files.cls_fitted, files.cls_model, files.cls_test, ood=far, samples=4)
    assert set(result.ood) == {"bayesian", "mean_weights"}
    assert set(result.ood["bayesian"]) == {
        "predictive_entropy",
        "mutual_information",
        "max_softmax",
    }
    # One mean network does not disagree with itself: mutual information is no score.
    assert set(result.ood["mean_weights"]) == {"predictive_entropy", "max_softmax"}
    for scores in result.ood.values():
        for values in scores.values():
            assert 0 <= values["auroc"] <= 1 and 0 < values["aupr"] <= 1
    assert result.summary["ood_examples"] == 30


def test_separable_validation_labels_leave_the_models_uncalibrated(files, tmp_path):
    x, labels = blobs(30, seed=13)  # clean blobs: the fitted classifier makes no mistake
    out = tmp_path / "c.safetensors"
    with pytest.raises(InputError, match="no temperature can be fitted"):
        bnnify.calibrate(files.cls_fitted, files.cls_model, (x, labels), samples=4, output=out)
    assert not out.exists()
