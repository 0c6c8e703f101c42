"""Tests of the report KL: float64, the same at any thread count and memory layout."""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnnify.bnn as bnn
from bnnify.bnn.kl_report import REPORT_CHUNK, fixed_sum, gaussian_report_kl, parameter_kl
from bnnify.bnn.kl_training import Segment, gaussian_scalars, store_kl
from bnnify.bnn.posteriors import GaussianPosterior

# Larger than torch's parallel grain (32768) and than a chunk, and not a multiple of either.
NUMEL = 2 * REPORT_CHUNK + 4099
PRIORS = [
    ("gaussian", None),
    (("gaussian", {"mu": 0.1, "sigma": 0.3}), None),
    ("laplace", None),
    (("empirical_gaussian", {"sigma": 0.2}), None),
    ("scale_mixture", 4),
    ("gaussian", 3),
]


@contextmanager
def threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _posterior(dtype=torch.float32, numel=NUMEL, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mu = torch.randn(numel, generator=generator).mul_(0.3).to(dtype)
    rho = (torch.rand(numel, generator=generator) * 4 - 6).to(dtype)
    return mu, rho


def _report(mu, rho, spec, samples, like=None):
    prior = bnn.get_prior(spec, like if like is not None else mu.detach().clone())
    torch.manual_seed(11)
    return gaussian_report_kl(mu, rho, prior, samples)


@pytest.mark.parametrize(("spec", "samples"), PRIORS)
def test_the_report_is_identical_at_1_and_4_threads(spec, samples):
    mu, rho = _posterior()
    with threads(1):
        one = _report(mu, rho, spec, samples)
    with threads(4):
        four = _report(mu, rho, spec, samples)
    # One code path, two thread counts: equality is the promise being tested.
    assert one.dtype == torch.float64 and one.shape == ()
    assert one.item() == four.item()


@pytest.mark.parametrize(("spec", "samples"), PRIORS)
def test_the_report_ignores_alignment_and_strides(spec, samples):
    mu, rho = _posterior()
    base_mu = torch.empty(NUMEL + 1)
    base_rho = torch.empty(NUMEL + 1)
    base_mu[1:], base_rho[1:] = mu, rho
    shifted = _report(base_mu[1:], base_rho[1:], spec, samples, like=mu)
    assert shifted.item() == _report(mu.clone(), rho.clone(), spec, samples).item()
    # A transposed (non-contiguous) parameter gives the KL of its logical elements.
    matrix_mu, matrix_rho = mu[: 91 * 97].view(91, 97), rho[: 91 * 97].view(91, 97)
    transposed = _report(matrix_mu.t(), matrix_rho.t(), spec, samples)
    contiguous = _report(matrix_mu.t().contiguous(), matrix_rho.t().contiguous(), spec, samples)
    assert transposed.item() == contiguous.item()


def test_the_report_is_exact_in_float64():
    mu, rho = _posterior(torch.float64)
    value = _report(mu, rho, ("gaussian", {"sigma": 0.5}), None)
    sigma = F.softplus(rho)
    terms = torch.log(0.5 / sigma) + (sigma.square() + mu.square()) / (2 * 0.25) - 0.5
    exact = math.fsum(terms.tolist())
    assert value.item() == pytest.approx(exact, rel=1e-14)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("spec", ["gaussian", "laplace"])
def test_the_report_agrees_with_the_training_kernel(dtype, rtol, spec):
    # Two code paths: the fused training kernel sums in float32 (dot products) for float32.
    mu, rho = _posterior(dtype)
    prior = bnn.get_prior(spec, mu)
    segment = Segment(0, NUMEL, prior, 0, gaussian_scalars(prior))
    training = store_kl(mu, rho, [segment], None)
    report = gaussian_report_kl(mu, rho, prior)
    torch.testing.assert_close(report, training.detach(), rtol=rtol, atol=0)


def test_monte_carlo_report_is_seeded_and_close_to_the_closed_form():
    mu, rho = _posterior(torch.float64, numel=3000)
    closed = _report(mu, rho, "gaussian", None)
    first = _report(mu, rho, "gaussian", 64)
    assert first.item() == _report(mu, rho, "gaussian", 64).item()
    assert first.item() == pytest.approx(closed.item(), rel=2e-2)


def test_kl_by_parameter_is_the_report_of_each_parameter():
    net = nn.Sequential(nn.Linear(300, 200), nn.Tanh(), nn.Linear(200, 3))
    model = bnn.BayesianModule(net, ("pretrained_gaussian", {"delta": 0.1}), "laplace")
    by_name = model.kl_by_parameter()
    for name in model.reparametrized_names():
        state = model.variational_state()
        posterior = GaussianPosterior(state[f"{name}.mu"], state[f"{name}.rho"])
        prior = model.priors[model.reparametrized_names().index(name)]
        # The same function on the same values, wherever they are stored.
        assert by_name[name].item() == parameter_kl(posterior, prior, None).item()
    total = math.fsum(v.item() for v in by_name.values())
    assert total == pytest.approx(model.kl_divergence().item(), rel=1e-6)


def test_kl_by_parameter_at_1_and_4_threads():
    model = bnn.BayesianModule(nn.Linear(400, 100), ("pretrained_gaussian", {"delta": 0.1}))
    with threads(1):
        one = model.kl_by_parameter()
    with threads(4):
        four = model.kl_by_parameter()
    assert {k: v.item() for k, v in one.items()} == {k: v.item() for k, v in four.items()}


def test_a_prior_without_fused_kernels_is_reported_through_distributions():
    class PlainGaussian(bnn.Prior):
        @property
        def distribution(self):
            return torch.distributions.Normal(torch.zeros(self.shape), torch.ones(self.shape))

    mu, rho = _posterior(torch.float32, numel=500)
    plain = gaussian_report_kl(mu, rho, PlainGaussian(shape=(500,)))
    fused = gaussian_report_kl(mu, rho, bnn.get_prior("gaussian", mu))
    torch.testing.assert_close(plain, fused, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="approx_num_samples"):

        class NoClosedForm(PlainGaussian):
            @property
            def distribution(self):
                return torch.distributions.Cauchy(torch.zeros(self.shape), 1.0)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gaussian_report_kl(mu, rho, NoClosedForm(shape=(500,)))


@pytest.mark.parametrize("numel", [0, 1, 255, 256, 257, 5000])
def test_fixed_sum_of_integers_is_exact(numel):
    values = torch.arange(numel, dtype=torch.float64)
    assert fixed_sum(values) == numel * (numel - 1) / 2
    assert fixed_sum(values.float()) == numel * (numel - 1) / 2
