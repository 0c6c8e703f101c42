"""Tests of bnnify.usecases.prune: a pruned checkpoint is a valid one, and says what was pruned."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fit_files import shared_fit_files

import bnnify
from bnnify.errors import InvalidArgumentError, OutputExistsError, UsageError
from bnnify.formats.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return shared_fit_files(tmp_path_factory)


def _mus(path) -> torch.Tensor:
    ckpt = Checkpoint(path)
    return torch.cat([ckpt.posterior_state(n)["mu"].reshape(-1) for n in ckpt.parameters])


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_keep_prunes_the_lowest_ratios_to_a_valid_checkpoint(files, tmp_path, keep):
    out = tmp_path / "p.safetensors"
    result = bnnify.prune(files.reg_fitted, keep=keep, output=out)
    assert result.removed == result.elements - math.floor(keep * result.elements + 0.5)
    ckpt = Checkpoint(out)  # opening checks every tensor against the metadata
    assert int((_mus(out) == 0).sum()) >= result.removed
    stats = bnnify.inspect(out, stats=True).parameters
    assert min(s.sigma_min for s in stats) == pytest.approx(result.pruned_sigma["float32"])
    kl_before, kl_after = bnnify.kl(files.reg_fitted).value, bnnify.kl(out).value
    assert math.isfinite(kl_after) and kl_after > kl_before  # point masses cost nats
    record = json.loads(ckpt.metadata["bnnify.prune"])
    assert record[-1]["removed"] == result.removed and record[-1]["keep"] == keep
    assert sum(record[-1]["parameters"].values()) == result.removed
    assert ckpt.fit is not None and ckpt.source == Checkpoint(files.reg_fitted).source
    x = torch.linspace(-3, 3, 20).unsqueeze(1)
    prediction = bnnify.predict(out, files.reg_model, x, samples=4)
    assert torch.isfinite(prediction.tensors["mean"]).all()


def test_every_weight_below_a_threshold_is_pruned_and_records_stack_up(files, tmp_path):
    first = bnnify.prune(files.reg_fitted, snr_threshold=2.0, output=tmp_path / "a.safetensors")
    assert first.snr_cut is not None and first.snr_cut < 2.0
    second = bnnify.prune(tmp_path / "a.safetensors", keep=0.1, output=tmp_path / "b.safetensors")
    assert second.removed >= first.removed  # the pruned weights have ratio 0: first to go
    history = json.loads(Checkpoint(tmp_path / "b.safetensors").metadata["bnnify.prune"])
    assert [h["method"] for h in history] == ["snr_threshold", "keep"]


def test_layer_scope_keeps_the_fraction_in_every_layer(files, tmp_path):
    result = bnnify.prune(files.reg_fitted, keep=0.25, scope="layer", output=tmp_path / "p.st")
    layers = {}
    for p in result.parameters:
        count = layers.setdefault(p["name"].rpartition(".")[0], [0, 0])
        count[0] += p["elements"]
        count[1] += p["removed"]
    for elements, removed in layers.values():
        assert elements - removed == math.floor(0.25 * elements + 0.5)


def test_metrics_before_and_after_use_predicts_definitions(files, tmp_path):
    same = bnnify.prune(
        files.reg_fitted, files.reg_model, keep=1.0, data=files.reg_train, output=tmp_path / "a"
    )
    assert same.removed == 0
    assert same.metrics["before"] == same.metrics["after"]  # one computation, one seed
    predicted = bnnify.predict(
        files.reg_fitted, files.reg_model, files.reg_train, targets=files.reg_train
    )
    for model in ("bayesian", "mean_weights"):
        assert same.metrics["before"][model] == pytest.approx(predicted.metrics[model])
    pruned = bnnify.prune(
        files.reg_fitted, files.reg_model, keep=0.5, data=files.reg_train, output=tmp_path / "b"
    )
    assert pruned.metrics["before"] == same.metrics["before"]
    assert pruned.metrics["after"] != pruned.metrics["before"]
    after = bnnify.predict(
        tmp_path / "b", files.reg_model, files.reg_train, targets=files.reg_train
    )
    for model in ("bayesian", "mean_weights"):
        assert pruned.metrics["after"][model] == pytest.approx(after.metrics[model])


def test_export_writes_a_plain_model_of_the_pruned_posterior(files, tmp_path):
    result = bnnify.prune(
        files.reg_fitted,
        files.reg_model,
        keep=0.2,
        export=True,
        format="state_dict",
        output=tmp_path / "p.state_dict.pt",
    )
    assert result.kind == "model" and result.export.format.value == "state_dict"
    state = torch.load(result.output, weights_only=True)
    names = list(Checkpoint(files.reg_fitted).parameters)
    zeros = sum(int((state[n] == 0).sum()) for n in names)
    assert zeros >= result.removed
    default = bnnify.prune(
        files.reg_fitted, files.reg_model, keep=0.2, export=True, format="state_dict"
    )
    assert default.output.name == "toy.fit.pruned.mean.state_dict.pt"
    default.output.unlink()


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({}, UsageError, "exactly one"),
        ({"keep": 0.5, "snr_threshold": 1.0}, UsageError, "exactly one"),
        ({"keep": 2.0}, InvalidArgumentError, "in \\[0, 1\\]"),
        ({"snr_threshold": -1.0}, InvalidArgumentError, ">= 0"),
        ({"snr_threshold": 1.0, "scope": "layer"}, UsageError, "--scope layer"),
        ({"keep": 0.5, "scope": "rows"}, InvalidArgumentError, "global, layer"),
        ({"keep": 0.5, "export": True}, UsageError, "--export needs the model"),
    ],
)
def test_invalid_options_are_refused_before_any_work(files, tmp_path, options, error, message):
    with pytest.raises(error, match=message):
        bnnify.prune(files.reg_fitted, output=tmp_path / "p.safetensors", **options)
    assert list(tmp_path.iterdir()) == []


def test_outputs_are_exclusive_and_never_an_input(files, tmp_path):
    out = tmp_path / "p.safetensors"
    bnnify.prune(files.reg_fitted, keep=0.5, output=out)
    with pytest.raises(OutputExistsError):
        bnnify.prune(files.reg_fitted, keep=0.5, output=out)
    with pytest.raises(UsageError, match="input"):
        bnnify.prune(out, keep=0.5, output=out, force=True)
