"""Tests of bnnify.usecases.predict: summaries, samples, batches, metrics, `bnnify.predict`."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from fit_files import shared_fit_files, single_thread

import bnnify
from bnnify.enums import Task
from bnnify.errors import InputError, InvalidArgumentError
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.data import Dataset, load_dataset
from bnnify.formats.model_files import load_model
from bnnify.formats.predictions import read_predictions
from bnnify.usecases.predict import PredictionResult, noise_of, predict_dataset
from bnnify.usecases.runner import open_runner

REGRESSION_KEYS = {"rmse", "mae", "nll", "log_likelihood", "crps", "calibration_error"}
REGRESSION_KEYS |= {f"{kind}_{level}" for kind in ("coverage", "width") for level in (50, 90, 95)}
CLASSIFICATION_KEYS = {"accuracy", "nll", "log_likelihood", "brier", "ece", "ece_bins"}

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    return shared_fit_files(tmp_path_factory)


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def toy(files):
    """The briefly fitted toy regression: its runner and noise scale."""
    with Checkpoint(files.reg_fitted) as ckpt:
        runner = open_runner(load_model(files.reg_model), ckpt)
        return runner, noise_of(ckpt.fit_tensors())


@pytest.fixture(scope="module")
def classifier(files):
    with Checkpoint(files.cls_fitted) as ckpt:
        return open_runner(load_model(files.cls_model), ckpt)


def grid(n: int = 20) -> Dataset:
    return Dataset(torch.linspace(-6, 6, n).unsqueeze(1), None, "grid")


def test_noise_of_a_fitted_and_a_converted_checkpoint(files, toy):
    assert toy[1] is not None and 0.01 < toy[1] < 1.0
    with Checkpoint(files.reg_ckpt) as ckpt:
        assert noise_of(ckpt.fit_tensors()) is None
    assert noise_of({"bnnify.fit.log_noise": torch.tensor(math.log(0.3))}) == pytest.approx(0.3)


def test_regression_outputs_decompose_the_spread(toy):
    runner, noise = toy
    result = predict_dataset(runner, grid(), task="regression", samples=16, noise=noise)
    assert isinstance(result, PredictionResult)
    tensors = result.tensors
    assert set(tensors) == {"mean", "std", "epistemic_std", "aleatoric_std"}
    for tensor in tensors.values():
        assert tensor.shape == (20, 1) and tensor.is_contiguous()
    squares = tensors["epistemic_std"] ** 2 + tensors["aleatoric_std"] ** 2
    assert torch.allclose(tensors["std"] ** 2, squares)
    assert torch.allclose(tensors["aleatoric_std"], torch.full((20, 1), noise))
    assert (tensors["epistemic_std"] > 0).all()
    assert result.summary == {
        "mean_std": pytest.approx(float(tensors["std"].mean())),
        "mean_epistemic_std": pytest.approx(float(tensors["epistemic_std"].mean())),
        "aleatoric_std": noise,
        "examples": 20,
        "task": "regression",
        "samples": 16,
        "mean_weights": False,
        "estimator": {
            "estimator": "weight_sampling",
            "reason": "a TorchScript model runs once per sample, every weight drawn from its "
            "posterior",
        },
    }
    assert result.metrics == {}


def test_kept_samples_are_those_summarised(toy):
    runner, noise = toy
    result = predict_dataset(
        runner, grid(), task="regression", samples=5, noise=noise, keep_samples=True
    )
    samples = result.tensors["samples"]
    assert samples.shape == (5, 20, 1)
    assert torch.allclose(result.tensors["mean"], samples.mean(0))
    assert torch.allclose(result.tensors["epistemic_std"], samples.std(0, unbiased=False))


def test_mean_weights_are_deterministic_and_leave_the_noise_only(toy):
    runner, noise = toy
    first = predict_dataset(runner, grid(), task="regression", noise=noise, mean_weights=True)
    second = predict_dataset(runner, grid(), task="regression", noise=noise, mean_weights=True)
    for key, tensor in first.tensors.items():
        assert torch.equal(tensor, second.tensors[key])
    assert torch.equal(first.tensors["epistemic_std"], torch.zeros(20, 1))
    assert torch.allclose(first.tensors["std"], torch.full((20, 1), noise))
    assert first.summary["samples"] == 1 and first.summary["mean_weights"] is True
    with torch.no_grad():
        assert torch.allclose(first.tensors["mean"], runner.mean_forward(grid().x))


def test_batches_give_the_same_predictive_distribution(toy):
    # Each batch draws its own weight samples, so the results agree in distribution:
    # the means within 5 standard errors, the spreads within sampling error.
    runner, noise = toy
    samples = 400
    torch.manual_seed(0)
    whole = predict_dataset(runner, grid(), task="regression", samples=samples, noise=noise)
    torch.manual_seed(0)
    parts = predict_dataset(
        runner, grid(), task="regression", samples=samples, batch_size=7, noise=noise
    )
    spread = whole.tensors["epistemic_std"]
    error = math.sqrt(2 / samples) * spread
    assert ((whole.tensors["mean"] - parts.tensors["mean"]).abs() <= 5 * error).all()
    ratio = parts.tensors["epistemic_std"] / spread
    assert ((ratio - 1).abs() < 5 / math.sqrt(samples)).all()
    exact = [
        predict_dataset(
            runner, grid(), task="regression", batch_size=b, noise=noise, mean_weights=True
        )
        for b in (7, 20)
    ]
    assert torch.allclose(exact[0].tensors["mean"], exact[1].tensors["mean"], atol=1e-6)


def test_classification_outputs_and_entropies(classifier, files):
    test = load_dataset(files.cls_test, with_target=False)
    result = predict_dataset(classifier, test, task="classification", samples=8)
    tensors = result.tensors
    assert set(tensors) == {
        "probs",
        "predicted",
        "predictive_entropy",
        "expected_entropy",
        "mutual_information",
    }
    assert tensors["probs"].shape == (150, 3)
    assert torch.allclose(tensors["probs"].sum(1), torch.ones(150, dtype=torch.float64))
    assert torch.equal(tensors["predicted"], tensors["probs"].argmax(1))
    total = tensors["expected_entropy"] + tensors["mutual_information"]
    assert torch.allclose(tensors["predictive_entropy"], total)
    assert sum(result.summary["class_counts"]) == 150
    assert len(result.summary["class_counts"]) == 3


def test_metrics_of_both_models_against_targets(classifier, toy, files):
    test = load_dataset(files.cls_test)
    result = predict_dataset(classifier, test, task="classification", samples=8)
    assert set(result.metrics) == {"bayesian", "mean_weights"}
    for metrics in result.metrics.values():
        assert set(metrics) == CLASSIFICATION_KEYS
        assert metrics["accuracy"] > 0.9
        assert metrics["nll"] == pytest.approx(-metrics["log_likelihood"])
    alone = predict_dataset(classifier, test, task="classification", mean_weights=True)
    assert set(alone.metrics) == {"mean_weights"}
    assert alone.metrics["mean_weights"] == result.metrics["mean_weights"]

    runner, noise = toy
    data = load_dataset(files.reg_train)
    data = Dataset(data.x[:50], data.y[:50], data.source)
    result = predict_dataset(runner, data, task="regression", samples=8, noise=noise)
    for metrics in result.metrics.values():
        assert set(metrics) == REGRESSION_KEYS
        assert 0 < metrics["rmse"] < 1
        assert 0 <= metrics["coverage_50"] <= metrics["coverage_90"] <= metrics["coverage_95"]
    without_noise = predict_dataset(runner, data, task="regression", samples=8)
    assert set(without_noise.metrics["bayesian"]) == {"rmse"}


def test_targets_that_do_not_fit_the_outputs_are_refused(classifier, toy):
    x = torch.randn(6, 2)
    labels = Dataset(x, torch.tensor([0, 1, 2, 3, 0, 1]), "labels")
    with pytest.raises(InputError, match=r"class indices must lie in \[0, 2\]"):
        predict_dataset(classifier, labels, task="classification", samples=2)
    runner, noise = toy
    wide = Dataset(torch.randn(6, 1), torch.randn(6, 3), "wide")
    with pytest.raises(InputError, match=r"1 output\(s\) per example but the targets have 3"):
        predict_dataset(runner, wide, task="regression", samples=2, noise=noise)


# ------------------------------------------------------------------ bnnify.predict


def test_predict_from_files_writes_the_predictions_file(files, tmp_path):
    out = tmp_path / "predictions.safetensors"
    result = bnnify.predict(
        files.reg_fitted, files.reg_model, files.reg_train, targets=files.reg_train, output=out
    )
    assert result.output == out and result.summary["task"] == "regression"
    assert set(result.metrics) == {"bayesian", "mean_weights"}
    written = read_predictions(out)
    assert (written.task, written.samples, written.checkpoint) == (
        Task.REGRESSION,
        32,
        files.reg_fitted.name,
    )
    assert sorted(written.tensors) == sorted([*result.tensors, "targets"])
    for name, tensor in result.tensors.items():
        assert torch.equal(written.tensors[name], tensor)
    assert torch.equal(written.tensors["targets"], load_dataset(files.reg_train).y)
    assert written.calibration is None
    assert result.to_json()["output"] == str(out)


def test_the_seed_decides_the_samples_and_the_global_rng_is_left_alone(files):
    x = torch.linspace(-3, 3, 12).unsqueeze(1)
    state = torch.get_rng_state()
    first = bnnify.predict(files.reg_fitted, files.reg_model, x, samples=4, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    again = bnnify.predict(files.reg_fitted, files.reg_model, x, samples=4, seed=1)
    other = bnnify.predict(files.reg_fitted, files.reg_model, x, samples=4, seed=2)
    assert torch.equal(first.tensors["mean"], again.tensors["mean"])
    assert not torch.equal(first.tensors["mean"], other.tensors["mean"])


def test_the_task_comes_from_the_fit_and_an_unfitted_regression_warns(files, caplog):
    labels = bnnify.predict(files.cls_fitted, files.cls_model, files.cls_test, samples=2)
    assert labels.summary["task"] == "classification" and not labels.metrics
    with caplog.at_level(logging.WARNING, logger="bnnify.usecases"):
        bnnify.predict(files.reg_ckpt, files.reg_model, torch.zeros(3, 1), samples=2)
    assert "the checkpoint was not fitted" in caplog.text


@pytest.mark.parametrize(("option", "value"), [("samples", 0), ("batch_size", 1.5)])
def test_invalid_counts_are_refused(files, option, value):
    with pytest.raises(InvalidArgumentError, match=option):
        bnnify.predict(files.reg_fitted, files.reg_model, torch.zeros(3, 1), **{option: value})


def test_predict_confirms_a_recorded_arch_with_its_kwargs(tmp_path):
    from fit_files import convert_file

    from bnnify.demo import build_model
    from bnnify.errors import UnsafeInputError
    from bnnify.formats.spec import resolve_spec

    torch.save(build_model().eval().state_dict(), tmp_path / "demo.pt")
    samples = Path(__file__).resolve().parent.parent / "sample_configs"
    spec = resolve_spec(samples / "state_dict_arch.yaml")
    ckpt = convert_file(tmp_path / "demo.pt", tmp_path / "demo.bnn.safetensors", spec=spec)
    x = torch.randn(6, 8)
    with pytest.raises(UnsafeInputError, match="--arch-kwargs"):
        bnnify.predict(ckpt, tmp_path / "demo.pt", x, arch=spec.arch)
    result = bnnify.predict(
        ckpt, tmp_path / "demo.pt", x, samples=2, arch=spec.arch, arch_kwargs=spec.arch_kwargs
    )
    assert result.summary["examples"] == 6


# ------------------------------------------ the estimator, classes beyond (N, C)


def test_the_estimator_is_the_proven_one_and_is_reported(tmp_path):
    from multi_input_models import mlp, token_classifier

    torch.manual_seed(0)
    net, tokens = mlp().eval(), token_classifier().eval()
    ckpt = bnnify.convert(net, output=tmp_path / "mlp.bnn.safetensors").outputs[0]
    x = torch.randn(12, 8)
    result = bnnify.predict(ckpt, net, x, samples=8, output=tmp_path / "p.safetensors")
    assert result.summary["estimator"]["estimator"] == "local_reparameterization"
    assert "nn.Sequential of row-wise layers" in result.summary["estimator"]["reason"]
    assert read_predictions(tmp_path / "p.safetensors").estimator == result.summary["estimator"]

    ckpt = bnnify.convert(tokens, output=tmp_path / "tokens.bnn.safetensors").outputs[0]
    per_token = bnnify.predict(ckpt, tokens, torch.randn(6, 5, 4), task="classification")
    assert per_token.summary["estimator"] == {
        "estimator": "weight_sampling",
        "reason": "the input has shape (6, 5, 4), not (batch, features)",
    }
    mean = bnnify.predict(ckpt, tokens, torch.randn(6, 5, 4), mean_weights=True)
    assert mean.summary["estimator"]["estimator"] == "posterior_mean"


def test_classes_along_another_dimension_and_labels_with_a_unit_axis(tmp_path):
    from multi_input_models import token_classifier

    class ClassesFirst(torch.nn.Module):  # (batch, classes, tokens), as segmentation models
        def __init__(self):
            super().__init__()
            self.net = token_classifier()

        def forward(self, x):
            return self.net(x).transpose(1, 2)

    torch.manual_seed(1)
    model = ClassesFirst().eval()
    ckpt = bnnify.convert(model, output=tmp_path / "c.bnn.safetensors").outputs[0]
    x, labels = torch.randn(10, 5, 4), torch.randint(0, 3, (10, 5))
    result = bnnify.predict(ckpt, model, x, targets=labels, task="classification",
                            class_dim=1, mean_weights=True)  # fmt: skip
    with torch.no_grad():
        probs = model(x).double().softmax(1).transpose(1, 2)
    assert torch.allclose(result.tensors["probs"], probs)
    assert result.summary["positions"] == 50
    accuracy = float((probs.argmax(-1) == labels).double().mean())
    assert result.metrics["mean_weights"]["accuracy"] == pytest.approx(accuracy)
    with pytest.raises(InputError, match=r"labels of shape \(10, 3\) do not match"):
        bnnify.predict(ckpt, model, x, targets=labels[:, :3], task="classification", class_dim=1)


def test_labels_of_shape_n_1_score_as_labels_of_shape_n(classifier, files):
    test = load_dataset(files.cls_test)
    column = Dataset(test.x, test.y.reshape(-1, 1), "column")
    flat = predict_dataset(classifier, test, task="classification", samples=4)
    torch.manual_seed(0)
    again = predict_dataset(classifier, column, task="classification", samples=4)
    for name, value in flat.metrics["mean_weights"].items():
        assert again.metrics["mean_weights"][name] == pytest.approx(value, rel=1e-12)
    assert set(again.metrics["bayesian"]) == set(flat.metrics["bayesian"])
    two = Dataset(test.x, test.y.reshape(-1, 1).expand(-1, 2), "two")
    with pytest.raises(InputError, match=r"labels of shape \(150, 2\) do not match"):
        predict_dataset(classifier, two, task="classification", samples=2)
