"""Tests of bnnify.usecases.kl: the KL of a checkpoint, tensor by tensor, and `bnnify.kl`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_files import shared_files

import bnnify
from bnnify.enums import Reduction
from bnnify.errors import InvalidArgumentError, SpecError
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.model_files import load_model
from bnnify.formats.report import read_report
from bnnify.formats.spec import resolve_spec
from bnnify.usecases.checkpoint_kl import checkpoint_kl
from bnnify.usecases.convert import convert

PRIORS = ["gaussian", "laplace", "scale_mixture", "empirical_gaussian"]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return shared_files(tmp_path_factory)


def make(models, folder, **spec_args):
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint, report = folder / "c.bnn.safetensors", folder / "c.kl.safetensors"
    with load_model(models.path("lstm", "safetensors")) as loaded:
        convert(loaded, resolve_spec(None, **spec_args), output=checkpoint, report=report)
    return checkpoint, read_report(report)


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("posterior", ["gaussian", "pretrained_gaussian"])
def test_the_kl_of_a_checkpoint_reproduces_its_report(models, tmp_path, posterior, prior):
    checkpoint, report = make(models, tmp_path, posterior=posterior, prior=prior, seed=3)
    progress = []
    with Checkpoint(checkpoint) as ckpt:
        again = checkpoint_kl(ckpt, progress=lambda n, total: progress.append((n, total)))
    assert again.to_json() == report.to_json()
    assert again.per_parameter == report.per_parameter
    total = sum(report.numels)
    assert progress == [(n, total) for n in report.numels]
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


# ---------------------------------------------------------------------- bnnify.kl


def test_kl_of_a_checkpoint_and_of_its_report(models, tmp_path):
    checkpoint, report = make(models, tmp_path)
    result = bnnify.kl(checkpoint, reduction="MEAN", output=tmp_path / "again.kl.safetensors")
    assert result.reduction is Reduction.MEAN and not result.from_report
    assert result.value == result.report.mean and result.to_json()["value"] == result.value
    assert result.to_json()["reduction"] == "mean"
    assert result.report.per_parameter == report.per_parameter
    saved = bnnify.kl(result.output)
    assert saved.from_report and saved.value == report.total
    assert saved.report.to_json() == report.to_json()


def test_a_report_refuses_the_computing_options(models, tmp_path):
    make(models, tmp_path)
    with pytest.raises(InvalidArgumentError, match="--prior, --mc-samples apply to a checkpoint"):
        bnnify.kl(tmp_path / "c.kl.safetensors", prior="laplace", mc_samples=4)
    with pytest.raises(InvalidArgumentError, match="--seed"):
        bnnify.kl(tmp_path / "c.kl.safetensors", seed=0)
    result = bnnify.kl(tmp_path / "c.kl.safetensors")
    assert result.from_report and result.report.prior["name"] == "gaussian"


def test_prior_arguments_merge_over_the_recorded_prior(models, tmp_path):
    checkpoint, _ = make(models, tmp_path, prior="laplace", prior_args=["scale=0.5"])
    merged = bnnify.kl(checkpoint, prior_args={"mu": 0.1})
    assert merged.report.prior == {"name": "laplace", "kwargs": {"mu": 0.1, "scale": 0.5}}
    same = bnnify.kl(checkpoint, prior="Laplace", prior_args=["mu=0.1"])
    assert same.report.prior == merged.report.prior
    other = bnnify.kl(checkpoint, prior="gaussian", prior_args={"sigma": 2.0})
    assert other.report.prior == {"name": "gaussian", "kwargs": {"sigma": 2.0}}
    with pytest.raises(SpecError, match=r"prior\.kwargs\.scale"):
        bnnify.kl(checkpoint, prior_args={"scale": -1})


def test_an_invalid_reduction_is_a_usage_error(models, tmp_path):
    checkpoint, _ = make(models, tmp_path)
    with pytest.raises(InvalidArgumentError, match="invalid reduction 'median'"):
        bnnify.kl(checkpoint, reduction="median")


@pytest.mark.parametrize("prior", ["gaussian", "scale_mixture"])
def test_progress_moves_within_a_large_tensor(tmp_path, prior):
    """Elements are reported chunk by chunk, not once per tensor, closed form or MC."""
    torch.save(torch.nn.Linear(200, 200).state_dict(), tmp_path / "big.pt")
    steps = []
    converted = bnnify.convert(
        tmp_path / "big.pt",
        output=tmp_path / "big.bnn.safetensors",
        prior=prior,
        progress=lambda n, total: steps.append((n, total)),
    )
    assert len(steps) > 2 and sum(n for n, _ in steps) == steps[0][1] == 40200
    steps.clear()
    bnnify.kl(converted.outputs[0], progress=lambda n, total: steps.append((n, total)))
    assert len(steps) > 2 and sum(n for n, _ in steps) == steps[0][1] == 40200
    assert max(n for n, _ in steps) < 40000
