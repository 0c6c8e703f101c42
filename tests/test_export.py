"""Tests of bnnify.usecases.export: exported files, run without bnnify, give bnnify's predictions.

Three sources: a TorchScript regression MLP, a torch.export classifier (both from
`fit_files`, fitted) and the demo's state dict with its `arch` (Linear-BatchNorm-ReLU-
Linear). Every exported file is run by `plain_check.py` in one child process where
importing bnnify fails, and compared with `bnnify.predict` (`--mean-weights`, or with
the same seed and samples where predict samples weights) or with the runner under the
same frozen samples (the demo model, for which predict uses the local trick).
Tolerances: 1e-6 where the computation is the same (same code, same weights; float32
probabilities against predict's float64), 1e-5 relative for vmap's batched kernels.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from fit_files import shared_fit_files
from safetensors.torch import load_file, save_file

import bnnify
from bnnify.bnn.ensemble import ensemble_moments
from bnnify.demo import synthetic_regression, train_demo_model
from bnnify.enums import ExportFormat
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.model_files import load_model
from bnnify.formats.plain_model import EXTENSIONS
from bnnify.formats.spec import resolve_spec
from bnnify.usecases.runner import open_runner

ROOT = Path(__file__).resolve().parent.parent
ARCH = {
    "arch": "bnnify.demo:build_model",
    "arch_kwargs": {"in_features": 8, "hidden": 32, "out_features": 1},
}

# name: (source, format, weights, seed, extra options)
EXPORTS = {
    "toy_mean_ts": ("toy", "torchscript", "mean", 0, {}),
    "toy_mean_sd": ("toy", "state_dict", "mean", 0, {}),
    "toy_mean_st": ("toy", "safetensors", "mean", 0, {}),
    "toy_sample": ("toy", "torchscript", "sample", 3, {}),
    "toy_ensemble": ("toy", "torchscript", "ensemble:5", 1, {}),
    "toy_total": ("toy", "torchscript", "ensemble:5", 1, {"aleatoric": True}),
    "blobs_mean_ep": ("blobs", "export", "mean", 0, {}),
    "blobs_mean_sd": ("blobs", "state_dict", "mean", 0, {}),
    "blobs_sample": ("blobs", "export", "sample", 2, {}),
    "blobs_ensemble": ("blobs", "export", "ensemble:4", 0, {}),
    "demo_mean_sd": ("demo", "state_dict", "mean", 0, {}),
    "demo_mean_st": ("demo", "safetensors", "mean", 0, {}),
    "demo_mean_ts": ("demo", "torchscript", "mean", 0, {}),
    "demo_mean_ep": ("demo", "export", "mean", 0, {}),
    "demo_sample": ("demo", "export", "sample", 5, {}),
    "demo_ensemble_ep": ("demo", "export", "ensemble:3", 0, {}),
    "demo_ensemble_ts": ("demo", "torchscript", "ensemble:3", 0, {}),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    files = shared_fit_files(tmp_path_factory)
    folder = tmp_path_factory.mktemp("export")
    with torch.random.fork_rng(devices=[]):
        net = train_demo_model(epochs=50)
    torch.save(net.state_dict(), folder / "demo.pt")
    spec = resolve_spec(ROOT / "sample_configs" / "state_dict_arch.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bnnify.convert(folder / "demo.pt", spec, output=folder / "demo.bnn.safetensors", **ARCH)
    toy_x = torch.linspace(-6, 6, 40).unsqueeze(1)  # beyond the training range too
    inputs = {
        "toy": toy_x,
        "blobs": load_file(str(files.cls_test))["x"],
        "demo": synthetic_regression(30, seed=2)[0],
    }
    save_file(inputs, str(folder / "inputs.safetensors"))
    return {
        "folder": folder,
        "inputs": inputs,
        "toy": (files.reg_fitted, files.reg_model, {}),
        "blobs": (files.cls_fitted, files.cls_model, {}),
        "demo": (folder / "demo.bnn.safetensors", folder / "demo.pt", ARCH),
    }


@pytest.fixture(scope="module")
def exported(sources):
    """Every export of `EXPORTS`, and what the child process computed from each file."""
    folder, jobs, results = sources["folder"], [], {}
    for name, (source, fmt, weights, seed, extra) in EXPORTS.items():
        checkpoint, model, arch = sources[source]
        result = bnnify.export(
            checkpoint,
            model,
            format=fmt,
            weights=weights,
            seed=seed,
            inputs=sources["inputs"][source],
            output=folder / f"{name}{EXTENSIONS[ExportFormat(fmt)]}",
            **arch,
            **extra,
        )
        results[name] = result
        base = {"toy": str(model), "blobs": str(model), "demo": "demo_mlp"}[source]
        jobs.append(
            {
                "name": name,
                "format": fmt,
                "path": str(result.output),
                "base": base,
                "inputs": source,
                "outputs": result.outputs,
            }
        )
    (folder / "jobs.json").write_text(json.dumps(jobs))
    child = subprocess.run(
        [
            sys.executable,
            "-I",
            str(ROOT / "tests" / "plain_check.py"),
            str(folder / "jobs.json"),
            str(folder / "inputs.safetensors"),
            str(folder / "outputs.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return results, load_file(str(folder / "outputs.safetensors"))


def _close(found, expected, atol=1e-6, rtol=0.0):
    torch.testing.assert_close(found.double(), expected.double(), rtol=rtol, atol=atol)


def _predict(sources, source, **options):
    checkpoint, model, arch = sources[source]
    x = sources["inputs"][source]
    return bnnify.predict(checkpoint, model, x, batch_size=1024, **arch, **options).tensors


def test_every_file_runs_at_any_batch_size_without_bnnify(exported):
    results, outputs = exported
    for name, result in results.items():
        for output in result.outputs:
            full, part = outputs[f"{name}.{output}"], outputs[f"{name}.{output}.part"]
            _close(part, full[:7], atol=1e-6)
        if result.format.value in ("torchscript", "export"):
            assert result.check["kind"] == "outputs" and result.check["examples"] > 7


def test_the_means_are_predict_mean_weights(sources, exported):
    _, outputs = exported
    for name in ("toy_mean_ts", "toy_mean_sd", "toy_mean_st"):
        _close(outputs[f"{name}.output"], _predict(sources, "toy", mean_weights=True)["mean"])
    for name in ("demo_mean_sd", "demo_mean_st", "demo_mean_ts", "demo_mean_ep"):
        _close(outputs[f"{name}.output"], _predict(sources, "demo", mean_weights=True)["mean"])
    probs = _predict(sources, "blobs", mean_weights=True)["probs"]
    for name in ("blobs_mean_ep", "blobs_mean_sd"):
        _close(torch.softmax(outputs[f"{name}.output"], -1), probs)


def test_a_sample_is_predicts_first_sample_with_the_same_seed(sources, exported):
    _, outputs = exported
    toy = _predict(sources, "toy", samples=1, seed=3, keep_samples=True)["samples"][0]
    _close(outputs["toy_sample.output"], toy)
    blobs = _predict(sources, "blobs", samples=1, seed=2, keep_samples=True)["samples"][0]
    _close(outputs["blobs_sample.output"], blobs)


def test_ensembles_are_predict_with_the_same_samples(sources, exported):
    results, outputs = exported
    toy = _predict(sources, "toy", samples=5, seed=1)
    _close(outputs["toy_ensemble.mean"], toy["mean"])
    _close(outputs["toy_ensemble.std"], toy["epistemic_std"])
    _close(outputs["toy_total.std"], toy["std"])  # the fitted noise in quadrature
    assert results["toy_total"].spread == "epistemic+aleatoric"
    assert results["toy_ensemble"].batching == "loop"
    blobs = _predict(sources, "blobs", samples=4, seed=0, keep_samples=True)
    _close(outputs["blobs_ensemble.mean"], blobs["probs"], atol=1e-5, rtol=1e-5)
    spread = torch.softmax(blobs["samples"].double(), -1).std(0, unbiased=False)
    _close(outputs["blobs_ensemble.std"], spread, atol=1e-5, rtol=1e-5)
    assert results["blobs_ensemble"].reduce == "probabilities"
    assert results["blobs_ensemble"].batching == "vmap"
    assert results["blobs_ensemble"].dynamic_batch is True


def test_the_premise_predict_samples_weights_for_the_export_program(sources):
    checkpoint, model, _ = sources["blobs"]
    with load_model(model) as loaded:
        runner = open_runner(loaded, Checkpoint(checkpoint))
    choice = runner.bnn.predictive_estimator(sources["inputs"]["blobs"])
    assert choice.estimator.value == "weight_sampling"


def test_samples_of_a_state_dict_model_are_the_runners_frozen_samples(sources, exported):
    results, outputs = exported
    checkpoint, model, arch = sources["demo"]
    x = sources["inputs"]["demo"]
    with load_model(model) as loaded:
        runner = open_runner(loaded, Checkpoint(checkpoint), **arch)
    with torch.no_grad():
        torch.manual_seed(5)
        with runner.bnn.frozen_sample():
            _close(outputs["demo_sample.output"], runner(x))
        torch.manual_seed(0)
        draws = []
        for _ in range(3):
            with runner.bnn.frozen_sample():
                draws.append(runner(x))
    mean, std = ensemble_moments(torch.stack(draws), False, 0.0)
    for name in ("demo_ensemble_ep", "demo_ensemble_ts"):
        _close(outputs[f"{name}.mean"], mean, atol=1e-5, rtol=1e-5)
        _close(outputs[f"{name}.std"], std, atol=1e-5, rtol=1e-5)
    # BatchNorm fixes the batch size under vmap: the program loops over the weight sets.
    assert results["demo_ensemble_ep"].batching == "loop"
    assert results["demo_ensemble_ep"].dynamic_batch is True
