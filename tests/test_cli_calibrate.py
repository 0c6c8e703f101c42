"""Tests of `bnnify calibrate` and of predict's calibration options through the entry point."""

from __future__ import annotations

import json

import pytest
import torch
from fit_files import blobs, cli, shared_fit_files, single_thread
from safetensors.torch import save_file

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return shared_fit_files(tmp_path_factory)


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with single_thread():
        yield


@pytest.fixture
def val(tmp_path):
    x, labels = blobs(20, seed=21)
    labels[::4] = (labels[::4] + 1) % 3  # some mistakes: a temperature inside the bounds
    save_file({"x": x, "y": labels}, "val.safetensors")
    return tmp_path / "val.safetensors"


def _calibrate(files, val, *options):
    return cli("calibrate", files.cls_fitted, "-m", files.cls_model, "--data", val, *options)


def test_calibrate_json_then_predict_applies_it_unless_told_not_to(files, val):
    result = _calibrate(files, val, "--samples", "4", "-o", "c.safetensors", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert list(info)[:2] == ["schema", "output"] and info["schema"] == "bnnify.calibrate/1"
    temperature = info["bayesian"]["temperature"]
    common = ("c.safetensors", "-m", files.cls_model, "-i", val, "--targets", val)
    predicted = json.loads(cli("predict", *common, "--samples", "4", "--json").stdout)
    applied = predicted["summary"]["calibration"]
    assert applied["applied"] and applied["value"] == temperature
    nll = predicted["metrics"]["bayesian"]["nll"]
    assert nll == pytest.approx(info["bayesian"]["after"]["nll"], rel=1e-6)
    raw = cli("predict", *common, "--samples", "4", "--no-calibration", "--json")
    ignored = json.loads(raw.stdout)["summary"]["calibration"]
    assert ignored == {"applied": False, "reason": "ignored on request"}
    human = cli("predict", *common, "--samples", "4")
    assert f"calibration: temperature {temperature:.4g}" in human.stdout


def test_human_output_and_the_default_name(files, val, tmp_path):
    copy = tmp_path / "m.fit.safetensors"
    copy.write_bytes(files.cls_fitted.read_bytes())
    result = cli("calibrate", copy, "-m", files.cls_model, "--data", val, "--samples", "2")
    assert result.exit_code == 0, result.output
    assert "temperature" in result.stdout and "wrote" in result.stdout
    assert (tmp_path / "m.fit.cal.safetensors").exists()
    quiet = cli("calibrate", copy, "-m", files.cls_model, "--data", val, "-q", "--force")
    assert quiet.exit_code == 0 and quiet.stdout == ""


def test_existing_output_and_bad_input_exit_codes(files, val):
    assert _calibrate(files, val, "--samples", "2", "-o", "c.safetensors").exit_code == 0
    again = _calibrate(files, val, "--samples", "2", "-o", "c.safetensors")
    assert again.exit_code == 2 and "Error:" in again.stderr and "--force" in again.stderr
    onto_input = _calibrate(files, val, "-o", files.cls_fitted, "--force")
    assert onto_input.exit_code == 2
    save_file({"x": torch.randn(4, 2)}, "unlabelled.safetensors")
    unlabelled = _calibrate(files, "unlabelled.safetensors")
    assert unlabelled.exit_code == 1 and "Error:" in unlabelled.stderr


def test_predict_ood_json(files, val):
    save_file({"x": torch.full((10, 2), 9.0) + torch.randn(10, 2)}, "far.safetensors")
    common = (files.cls_fitted, "-m", files.cls_model, "-i", val, "--samples", "4")
    data = json.loads(cli("predict", *common, "--ood", "far.safetensors", "--json").stdout)
    assert set(data["ood"]["bayesian"]) == {
        "predictive_entropy",
        "mutual_information",
        "max_softmax",
    }
    assert data["summary"]["ood_examples"] == 10
    human = cli("predict", *common, "--ood", "far.safetensors")
    assert "Out-of-distribution detection" in human.stdout and "auroc" in human.stdout
