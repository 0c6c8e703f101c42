"""Tests of the variational posteriors: initialization, sampling and validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

import bnnify.bnn as bnn
from bnnify.bnn.posteriors import accepted_kwargs, init_function, inverse_softplus
from bnnify.errors import InvalidArgumentError

POSTERIORS = ["gaussian", "normal", "pretrained_gaussian", "pretrained_normal"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", POSTERIORS)
def test_posterior_sample_shape_dtype_and_gradient(name, dtype):
    param = torch.randn(4, 3).to(dtype)
    posterior = bnn.get_posterior(name, param)
    assert isinstance(posterior, bnn.VariationalPosterior)
    assert posterior.mu.shape == posterior.rho.shape == param.shape
    assert posterior.mu.dtype == posterior.rho.dtype == dtype
    sample = posterior.sample_parameters()
    assert sample.shape == param.shape and sample.dtype == dtype
    assert posterior().shape == param.shape
    assert not torch.equal(sample, posterior.sample_parameters())
    sample.square().sum().backward()
    assert posterior.mu.grad.abs().sum() > 0 and posterior.rho.grad.abs().sum() > 0
    assert posterior.distribution.batch_shape == param.shape
    assert posterior.mean is posterior.mu


@pytest.mark.parametrize("name", POSTERIORS)
def test_posterior_samples_have_the_posterior_moments(name):
    posterior = bnn.get_posterior(name, torch.randn(3, dtype=torch.float64))
    samples = torch.stack([posterior.sample_parameters().detach() for _ in range(20_000)])
    sigma = F.softplus(posterior.rho.detach())
    error = sigma / math.sqrt(len(samples))
    assert ((samples.mean(0) - posterior.mu.detach()).abs() < 4 * error).all()
    torch.testing.assert_close(samples.std(0), sigma, rtol=0.03, atol=0)


def test_gaussian_default_init_matches_the_reference():
    posterior = bnn.GaussianPosterior.from_param(torch.full((200, 500), 7.0))
    assert abs(posterior.mu.mean().item()) < 4 * 0.1 / math.sqrt(100_000)
    assert abs(posterior.mu.std().item() - 0.1) < 0.002
    assert torch.equal(posterior.rho, torch.full((200, 500), -3.0))
    torch.testing.assert_close(posterior.sigma, F.softplus(torch.tensor(-3.0)).expand(200, 500))


def test_gaussian_init_options():
    param = torch.randn(50)
    zero = bnn.GaussianPosterior.from_param(param, mu_std=0.0, rho=-1.0)
    assert torch.equal(zero.mu, torch.zeros(50)) and torch.equal(zero.rho, torch.full((50,), -1.0))
    fixed = bnn.get_posterior(("gaussian", {"sigma": 0.25}), param)
    torch.testing.assert_close(fixed.sigma, torch.full((50,), 0.25))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pretrained_keeps_the_weights(dtype):
    weight = torch.randn(5, 4).to(dtype)
    posterior = bnn.get_posterior("pretrained_gaussian", weight)
    assert torch.equal(posterior.mu, weight)
    assert posterior.mu.data_ptr() != weight.data_ptr()
    assert torch.equal(posterior.rho, torch.full_like(weight, -3.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pretrained_delta_is_relative_and_floored(dtype):
    weight = torch.tensor([2.0, -0.5, 1e-5, 0.0], dtype=dtype)
    spec = ("pretrained_gaussian", {"delta": 0.1, "min_sigma": 1e-3})
    posterior = bnn.get_posterior(spec, weight)
    assert torch.equal(posterior.mu, weight)
    expected = torch.tensor([0.2, 0.05, 1e-3, 1e-3], dtype=dtype)
    torch.testing.assert_close(posterior.sigma, expected)


def test_pretrained_constant_sigma_and_floor():
    weight = torch.randn(10)
    constant = bnn.get_posterior(("pretrained_gaussian", {"sigma": 0.05}), weight)
    torch.testing.assert_close(constant.sigma, torch.full((10,), 0.05))
    floored = bnn.get_posterior(("pretrained_gaussian", {"sigma": 1e-4, "min_sigma": 0.01}), weight)
    torch.testing.assert_close(floored.sigma, torch.full((10,), 0.01))
    from_rho = bnn.get_posterior(("pretrained_gaussian", {"rho": -30.0, "min_sigma": 0.01}), weight)
    torch.testing.assert_close(from_rho.sigma, torch.full((10,), 0.01))
    relative = bnn.get_posterior(("pretrained_gaussian", {"delta": 0.5}), weight)
    torch.testing.assert_close(relative.sigma, 0.5 * weight.abs().clamp_min(1e-6))


@pytest.mark.parametrize(
    "kwargs",
    [{"delta": 0.5, "sigma": 9.0}, {"rho": -2.0, "sigma": 0.1}, {"rho": -2.0, "delta": 0.1}],
)
def test_pretrained_spread_options_are_exclusive(kwargs):
    with pytest.raises(InvalidArgumentError, match="give one of rho, sigma and delta"):
        bnn.get_posterior(("pretrained_gaussian", kwargs), torch.randn(3))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (("gaussian", {"sigma": 0.0}), "sigma must be a finite number > 0, got 0.0"),
        (("gaussian", {"sigma": -0.1}), "sigma must be a finite number > 0"),
        (("gaussian", {"sigma": math.nan}), "sigma must be a finite number"),
        (("gaussian", {"sigma": True}), "sigma must be a finite number"),
        (("gaussian", {"rho": math.inf}), "rho must be a finite number"),
        (("gaussian", {"rho": "-3"}), "rho must be a finite number"),
        (("gaussian", {"mu_std": -1.0}), "mu_std must be a finite number >= 0"),
        (("gaussian", {"delta": 0.1}), r"invalid arguments .*'delta'"),
        (("pretrained_gaussian", {"delta": 0.0}), "delta must be a finite number > 0"),
        (("pretrained_gaussian", {"min_sigma": 0.0}), "min_sigma must be a finite number > 0"),
        (("pretrained_gaussian", {"sigma": -1.0}), "sigma must be a finite number > 0"),
        (("pretrained_gaussian", {"mu_std": 0.1}), "invalid arguments"),
    ],
)
def test_invalid_posterior_arguments(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        bnn.get_posterior(spec, torch.randn(3))
    assert isinstance(info.value, InvalidArgumentError)


def test_unknown_kwarg_lists_the_accepted_ones():
    with pytest.raises(InvalidArgumentError) as info:
        bnn.get_posterior(("pretrained_gaussian", {"sigmaa": 1.0}), torch.randn(3))
    for name in ("rho", "sigma", "delta", "min_sigma"):
        assert name in info.value.hint
    assert accepted_kwargs(init_function(bnn.GaussianPosterior)) == ["mu_std", "rho", "sigma"]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_pretrained_refuses_non_finite_weights(bad):
    weight = torch.tensor([1.0, bad])
    with pytest.raises(InvalidArgumentError, match="NaN or infinite"):
        bnn.get_posterior("pretrained_gaussian", weight)


def test_get_posterior_default_and_argument_order():
    param = torch.randn(3, 2)
    assert type(bnn.get_posterior(None, param)) is bnn.GaussianPosterior
    with pytest.raises(InvalidArgumentError, match="invalid posterior spec"):
        bnn.get_posterior(param, "pretrained_normal")  # the spec comes first
    with pytest.raises(KeyError, match="Did you mean 'pretrained_gaussian'"):
        bnn.get_posterior("pretrained_gausian", param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma", [1e-8, 1e-3, 0.5, 1.0, 30.0, 1e4])
def test_inverse_softplus_round_trips(sigma, dtype):
    value = torch.tensor([sigma], dtype=dtype)
    rho = inverse_softplus(value)
    assert rho.dtype == dtype and torch.isfinite(rho).all()
    torch.testing.assert_close(F.softplus(rho), value, rtol=1e-5, atol=0)


def test_base_class_requires_the_protocol():
    class Incomplete(bnn.VariationalPosterior):
        pass

    with pytest.raises(NotImplementedError, match="from_param"):
        Incomplete.from_param(torch.zeros(2))
    with pytest.raises(NotImplementedError, match="distribution"):
        Incomplete().sample_parameters()


def test_base_class_defaults_use_the_distribution():
    class Fixed(bnn.VariationalPosterior):
        def __init__(self):
            super().__init__()
            self.loc = torch.nn.Parameter(torch.tensor([1.0, 2.0]))

        @property
        def distribution(self):
            return Normal(self.loc, torch.tensor([1e-3, 1e-3]))

    posterior = Fixed()
    assert torch.equal(posterior.mean, posterior.loc)
    sample = posterior()
    assert sample.shape == (2,) and (sample - posterior.loc).abs().max() < 0.01
    sample.sum().backward()
    assert torch.equal(posterior.loc.grad, torch.ones(2))


@pytest.mark.parametrize("spec", ["gaussian", ("pretrained_gaussian", {"delta": 0.2})])
def test_initialize_into_equals_from_param(spec, monkeypatch):
    from bnnify.bnn import posteriors

    monkeypatch.setattr(posteriors, "_CHUNK", 4)  # several chunks for the delta spread
    weight = torch.randn(5, 3)
    torch.manual_seed(1)
    built = bnn.get_posterior(spec, weight)
    mu, rho = torch.empty_like(weight), torch.empty_like(weight)
    torch.manual_seed(1)
    posteriors.initialize_into(spec, mu, rho, weight)
    assert torch.equal(mu, built.mu) and torch.equal(rho, built.rho)


# ---------------------------------------------------------------- any strides


def _strided_weights():
    conv = torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last)
    linear = torch.randn(5, 7).t()
    return {"channels_last": conv, "transposed": linear, "sliced": torch.randn(6, 8)[:, ::2]}


POSTERIOR_SPECS = [
    "gaussian",
    ("gaussian", {"sigma": 0.2}),
    "pretrained_gaussian",
    ("pretrained_gaussian", {"delta": 0.1}),
    ("pretrained_gaussian", {"sigma": 0.05}),
]


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("spec", POSTERIOR_SPECS)
def test_posteriors_accept_any_strides_and_return_contiguous_tensors(spec, layout):
    weight = _strided_weights()[layout]
    assert not weight.is_contiguous()
    torch.manual_seed(0)
    posterior = bnn.get_posterior(spec, weight)
    torch.manual_seed(0)
    expected = bnn.get_posterior(spec, weight.contiguous())
    for name in ("mu", "rho"):
        tensor = getattr(posterior, name)
        assert tensor.is_contiguous() and tensor.shape == weight.shape
        assert torch.equal(tensor, getattr(expected, name))
    restored = bnn.GaussianPosterior(weight, weight.abs())
    assert restored.mu.is_contiguous() and restored.rho.is_contiguous()
    assert torch.equal(restored.mu, weight)
