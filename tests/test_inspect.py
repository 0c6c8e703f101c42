"""Tests of bnnify.usecases.inspect: what a checkpoint holds, and its posterior statistics."""

from __future__ import annotations

import json

import pytest
import torch.nn.functional as F
from model_files import shared_files

import bnnify
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.model_files import load_model
from bnnify.formats.spec import resolve_spec
from bnnify.usecases.convert import convert
from bnnify.usecases.inspect import InspectResult
from bnnify.usecases.parameter_stats import parameter_stats


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return shared_files(tmp_path_factory)


def make(models, folder, **spec_args):
    checkpoint, report = folder / "c.bnn.safetensors", folder / "c.kl.safetensors"
    with load_model(models.path("lstm", "safetensors")) as loaded:
        convert(loaded, resolve_spec(None, **spec_args), output=checkpoint, report=report)
    return checkpoint


def test_parameter_statistics(models, tmp_path):
    checkpoint = make(models, tmp_path, posterior_args=["sigma=0.05"])
    with Checkpoint(checkpoint) as ckpt:
        rows = parameter_stats(ckpt)
        state = ckpt.variational_state()
    assert [row.name for row in rows] == list(ckpt.parameters)
    for row in rows:
        mu = state[row.name + ".mu"].double()
        sigma = F.softplus(state[row.name + ".rho"].double())
        assert row.shape == list(mu.shape)
        assert row.elements == mu.numel()
        assert row.dtype == "float32"
        assert row.sigma_mean == pytest.approx(0.05, rel=1e-5)
        assert row.sigma_min == pytest.approx(float(sigma.min()))
        assert row.sigma_max == pytest.approx(float(sigma.max()))
        snr = mu.abs() / sigma
        assert row.snr_mean == pytest.approx(float(snr.mean()))
        assert row.snr_median == pytest.approx(float(snr.reshape(-1).median()))


def test_inspect_a_checkpoint_file(models, tmp_path):
    checkpoint = make(models, tmp_path)
    result = bnnify.inspect(checkpoint)
    assert isinstance(result, InspectResult)
    assert result.files == [checkpoint] and result.bytes == checkpoint.stat().st_size
    data = json.loads(json.dumps(result.to_json()))
    assert data["format"] == "bnnify.variational" and data["format_version"] == "1"
    assert data["source"]["format"] == "safetensors" and data["fit"] is None
    assert data["variational_elements"] == sum(p["elements"] for p in data["parameters"])
    with Checkpoint(checkpoint) as ckpt:
        assert bnnify.inspect(ckpt).to_json() == result.to_json()
        assert data["spec"] == ckpt.spec.to_json()
        assert set(data["deterministic"]) == set(ckpt.deterministic)
