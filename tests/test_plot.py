"""Tests of `bnnify.plot`: each figure written and decoding, the numbers drawn the metrics."""

from __future__ import annotations

import pytest
from fit_files import shared_fit_files, single_thread, toy_regression
from safetensors.torch import save_file
from test_plots import png_size, svg_root

import bnnify
from bnnify.errors import OutputExistsError, UsageError

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return shared_fit_files(tmp_path_factory)


@pytest.fixture(scope="module")
def predicted(files, tmp_path_factory):
    """Predictions (with targets) of both tasks, and what predict reported for them."""
    folder = tmp_path_factory.mktemp("predicted")
    x, y = toy_regression(60, seed=31)
    save_file({"x": x, "y": y}, str(folder / "toy.test.safetensors"))
    results = {}
    with single_thread():
        results["regression"] = bnnify.predict(
            files.reg_fitted,
            files.reg_model,
            folder / "toy.test.safetensors",
            targets=folder / "toy.test.safetensors",
            samples=8,
            keep_samples=True,
            keep_inputs=True,
            output=folder / "reg.safetensors",
        )
        results["classification"] = bnnify.predict(
            files.cls_fitted,
            files.cls_model,
            files.cls_test,
            targets=files.cls_test,
            samples=8,
            output=folder / "cls.safetensors",
        )
    return results


def test_checkpoint_figures_draw_the_kl_report_and_the_posterior(files, tmp_path):
    result = bnnify.plot(files.reg_fitted, out_dir=tmp_path)
    assert set(result.figures) == {"layers", "sigma"}
    assert set(result.skipped) == {"reliability", "coverage", "bands"}
    assert "drawn from a predictions file" in result.skipped["coverage"]
    layers = result.figures["layers"]
    assert layers["path"] == str(tmp_path / "toy.fit.layers.png")
    png_size(tmp_path / "toy.fit.layers.png")
    report = bnnify.kl(files.reg_fitted).report
    drawn = layers["drawn"]
    assert drawn["kl"]["names"] == report.names
    assert drawn["kl"]["values"] == pytest.approx(report.per_parameter, rel=1e-9)
    stats = {row.name: row for row in bnnify.inspect(files.reg_fitted, stats=True).parameters}
    assert drawn["snr"]["values"] == pytest.approx(
        [stats[name].snr_mean for name in drawn["snr"]["names"]], rel=1e-9
    )
    sigma = result.figures["sigma"]["drawn"]
    assert sigma["count"] == sum(row.elements for row in stats.values())
    assert sigma["min"] == pytest.approx(min(row.sigma_min for row in stats.values()))
    assert sigma["max"] == pytest.approx(max(row.sigma_max for row in stats.values()))
    assert sum(sigma["counts"]) == sigma["count"]


def test_reliability_diagram_draws_predicts_ece(predicted, tmp_path):
    source = predicted["classification"].output
    result = bnnify.plot(predictions=source, out_dir=tmp_path, image_format="svg")
    assert set(result.figures) == {"reliability"}
    assert set(result.skipped) == {"coverage", "bands", "layers", "sigma"}
    assert result.skipped["coverage"] == "a classification has no predictive intervals"
    svg_root(tmp_path / "cls.reliability.svg")
    metrics = predicted["classification"].metrics["bayesian"]
    drawn = result.figures["reliability"]["drawn"]
    assert drawn["ece"] == pytest.approx(metrics["ece"], rel=1e-9)
    assert drawn["bins"] == metrics["ece_bins"]
    assert sum(drawn["counts"]) == predicted["classification"].summary["examples"]


def test_coverage_and_bands_draw_predicts_intervals(predicted, tmp_path):
    result = bnnify.plot(predictions=predicted["regression"].output, out_dir=tmp_path)
    assert set(result.figures) == {"coverage", "bands"}
    for name in ("coverage", "bands"):
        png_size(tmp_path / f"reg.{name}.png")
    metrics = predicted["regression"].metrics["bayesian"]
    coverage = result.figures["coverage"]["drawn"]
    assert coverage["predictive"] == "mixture"
    assert coverage["calibration_error"] == pytest.approx(metrics["calibration_error"])
    levels = coverage["levels"]
    for level in (50, 90, 95):
        at = min(range(len(levels)), key=lambda i: abs(levels[i] - level / 100))
        assert coverage["interval_coverage"][at] == pytest.approx(metrics[f"coverage_{level}"])
    bands = result.figures["bands"]["drawn"]
    tensors = predicted["regression"].tensors
    assert bands["x"] == sorted(bands["x"]) and len(bands["x"]) == 60
    mean = tensors["mean"].reshape(-1).double().sort().values
    # float32 means of two code paths: an absolute tolerance for the values near zero.
    assert sorted(bands["mean"]) == pytest.approx(mean.tolist(), rel=1e-6, abs=1e-6)
    pairs = zip(bands["total_lower"], bands["epistemic_lower"], strict=True)
    assert all(total <= epistemic for total, epistemic in pairs)


def test_figures_asked_for_that_the_inputs_cannot_give_are_refused(files, predicted, tmp_path):
    source = predicted["classification"].output
    with pytest.raises(UsageError, match="cannot draw \\['coverage'\\]"):
        bnnify.plot(predictions=source, figures=["coverage"], out_dir=tmp_path)
    with pytest.raises(UsageError, match="checkpoint, a predictions file or both"):
        bnnify.plot()
    only = bnnify.plot(files.cls_fitted, figures=["sigma"], out_dir=tmp_path)
    assert set(only.figures) == {"sigma"}
    with pytest.raises(OutputExistsError):
        bnnify.plot(files.cls_fitted, figures=["sigma", "layers"], out_dir=tmp_path)
    assert not (tmp_path / "blobs.fit.layers.png").exists()  # nothing drawn before refusing
    bnnify.plot(files.cls_fitted, figures=["sigma"], out_dir=tmp_path, force=True)
