"""Tests of bnnify.usecases.analysis: the KL and statistics of a checkpoint, tensor by tensor."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_files import shared_files

from bnnify.errors import SpecError
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.model_files import load_model
from bnnify.formats.report import read_report
from bnnify.formats.spec import resolve_spec
from bnnify.usecases.analysis import checkpoint_kl, parameter_stats
from bnnify.usecases.convert import convert

PRIORS = ["gaussian", "laplace", "scale_mixture", "empirical_gaussian"]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return shared_files(tmp_path_factory)


def make(models, folder, **spec_args):
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint, report = folder / "c.bnn.safetensors", folder / "c.kl.safetensors"
    with load_model(models.path("lstm", "safetensors")) as loaded:
        convert(loaded, resolve_spec(None, **spec_args), checkpoint=checkpoint, report=report)
    return checkpoint, read_report(report)


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("posterior", ["gaussian", "pretrained_gaussian"])
def test_the_kl_of_a_checkpoint_reproduces_its_report(models, tmp_path, posterior, prior):
    checkpoint, report = make(models, tmp_path, posterior=posterior, prior=prior, seed=3)
    progress = []
    with Checkpoint(checkpoint) as ckpt:
        again = checkpoint_kl(ckpt, progress=progress.append)
    assert again.to_json() == report.to_json()
    assert torch.equal(again.per_parameter, report.per_parameter)
    assert progress == report.numels.tolist()
    assert (report.method == "monte_carlo") == (prior == "scale_mixture")


def test_another_seed_changes_a_monte_carlo_estimate_only(models, tmp_path):
    checkpoint, report = make(models, tmp_path, prior="scale_mixture")
    with Checkpoint(checkpoint) as ckpt:
        other = checkpoint_kl(ckpt, seed=1)
        assert other.total != report.total
        assert other.total == pytest.approx(report.total, rel=0.05)
        assert checkpoint_kl(ckpt, seed=0).total == report.total


def test_a_prior_override_matches_the_library(models, tmp_path):
    checkpoint, report = make(models, tmp_path)
    prior = ("laplace", {"scale": 0.5})
    with Checkpoint(checkpoint) as ckpt:
        other = checkpoint_kl(ckpt, prior=prior)
        with torch.no_grad():
            expected = ckpt.to_bayesian(prior=prior).kl_divergence()
    assert other.prior == {"name": "laplace", "kwargs": {"scale": 0.5}}
    assert other.posterior == report.posterior
    assert other.total == pytest.approx(float(expected), rel=1e-5)
    assert other.total != pytest.approx(report.total)


def test_monte_carlo_is_close_to_the_closed_form(models, tmp_path):
    checkpoint, report = make(models, tmp_path, posterior="gaussian")
    samples = 64
    with Checkpoint(checkpoint) as ckpt:
        estimate = checkpoint_kl(ckpt, mc_samples=samples)
        state = ckpt.variational_state()
    assert (estimate.method, estimate.samples) == ("monte_carlo", samples)
    # Standard error of the estimate: the spread of log q(w) - log p(w), w ~ q, per element.
    variance = 0.0
    for name in ckpt.parameters:
        q = torch.distributions.Normal(
            state[f"{name}.mu"].double(), F.softplus(state[f"{name}.rho"].double())
        )
        w = q.sample((2000,))
        ratio = q.log_prob(w) - torch.distributions.Normal(0.0, 1.0).log_prob(w)
        variance += float(ratio.var(dim=0).sum())
    error = math.sqrt(variance / samples)
    assert abs(estimate.total - report.total) < 5 * error
    assert estimate.total != report.total


def test_the_empirical_prior_needs_the_recorded_weights(models, tmp_path):
    checkpoint, _ = make(models, tmp_path)
    with Checkpoint(checkpoint) as ckpt, pytest.raises(SpecError, match="original weights"):
        checkpoint_kl(ckpt, prior=("empirical_gaussian", {}))


def test_parameter_statistics(models, tmp_path):
    checkpoint, _ = make(models, tmp_path, posterior_args=["sigma=0.05"])
    with Checkpoint(checkpoint) as ckpt:
        rows = parameter_stats(ckpt)
        state = ckpt.variational_state()
    assert [row["name"] for row in rows] == list(ckpt.parameters)
    for row in rows:
        mu = state[row["name"] + ".mu"].double()
        sigma = F.softplus(state[row["name"] + ".rho"].double())
        assert row["shape"] == list(mu.shape)
        assert row["elements"] == mu.numel()
        assert row["dtype"] == "float32"
        assert row["sigma_mean"] == pytest.approx(0.05, rel=1e-5)
        assert row["sigma_min"] == pytest.approx(float(sigma.min()))
        assert row["sigma_max"] == pytest.approx(float(sigma.max()))
        snr = mu.abs() / sigma
        assert row["snr_mean"] == pytest.approx(float(snr.mean()))
        assert row["snr_median"] == pytest.approx(float(snr.reshape(-1).median()))
