"""Tests of the priors: construction, validation, densities and closed forms."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributions import Laplace, Normal, kl_divergence

import bnnify.bnn as bnn
from bnnify.bnn.priors import laplace_gaussian_kl
from bnnify.errors import InvalidArgumentError

PRIOR_SPECS = [
    "gaussian",
    ("normal", {"mu": 0.3, "sigma": 0.5}),
    "empirical_gaussian",
    ("empirical_gaussian", {"sigma": 0.1}),
    "laplace",
    ("laplace", {"mu": -0.2, "scale": 0.7}),
    "scale_mixture",
    ("scale_mixture", {"pi": 0.25, "sigma1": 2.0, "sigma2": 0.1}),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", PRIOR_SPECS)
def test_prior_from_param_has_the_parameter_shape(spec, dtype):
    param = torch.randn(4, 3).to(dtype)
    prior = bnn.get_prior(spec, param)
    assert isinstance(prior, bnn.Prior)
    assert prior.shape == param.shape
    expected_dtype = torch.float32 if dtype is torch.bfloat16 else dtype
    assert all(buf.dtype == expected_dtype for buf in prior.buffers())
    distribution = prior.distribution
    assert distribution.batch_shape == param.shape
    log_prob = distribution.log_prob(param.to(expected_dtype))
    assert log_prob.shape == param.shape and torch.isfinite(log_prob).all()


@pytest.mark.parametrize("spec", ["gaussian", "laplace", "scale_mixture"])
def test_scalar_priors_do_not_build_parameter_sized_tensors(spec):
    prior = bnn.get_prior(spec, torch.empty(1000, 1000))
    assert all(buf.numel() == 1 for buf in prior.buffers())


def test_prior_buffers_are_saved_and_follow_to():
    prior = bnn.GaussianPrior(shape=(3,), mu=0.5, sigma=2.0)
    assert set(prior.state_dict()) == {"mu", "sigma"}
    prior.double()
    assert prior.mu.dtype == torch.float64 and prior.distribution.mean.dtype == torch.float64
    assert "mu=0.5" in repr(prior) and "sigma=2" in repr(prior)


def test_get_prior_default_and_argument_order():
    param = torch.randn(2, 5, dtype=torch.float64)
    default = bnn.get_prior(None, param)
    assert type(default) is bnn.GaussianPrior
    assert float(default.mu) == 0.0 and float(default.sigma) == 1.0
    with pytest.raises(InvalidArgumentError, match="invalid prior spec"):
        bnn.get_prior(param, "laplace")  # the spec comes first
    by_shape = bnn.get_prior(("gaussian", {"sigma": 3.0}), shape=(7,), dtype=torch.float64)
    assert by_shape.shape == (7,) and by_shape.sigma.dtype == torch.float64


def test_integer_arguments_become_floats():
    prior = bnn.GaussianPrior(shape=(2,), mu=1, sigma=2)
    assert prior.mu.is_floating_point() and prior.sigma.is_floating_point()


def test_tensor_arguments_broadcast_and_are_copied():
    sigma = torch.tensor([0.5, 1.0, 2.0])
    prior = bnn.get_prior(("gaussian", {"sigma": sigma}), torch.zeros(2, 3))
    sigma.fill_(9.0)
    torch.testing.assert_close(prior.distribution.stddev[1], torch.tensor([0.5, 1.0, 2.0]))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (("gaussian", {"sigma": 0.0}), "sigma must be > 0, got 0.0"),
        (("gaussian", {"sigma": -1.0}), "sigma must be > 0"),
        (("gaussian", {"sigma": torch.tensor([1.0, -1.0, 1.0])}), "sigma must be > 0"),
        (("gaussian", {"mu": math.nan}), "mu must be finite"),
        (("gaussian", {"sigma": math.inf}), "sigma must be finite"),
        (("gaussian", {"mu": torch.zeros(4)}), r"shape \(4,\) does not broadcast"),
        (("laplace", {"scale": 0.0}), "scale must be > 0"),
        (("empirical_gaussian", {"sigma": -2.0}), "sigma must be > 0"),
        (("empirical_gaussian", {"mu": 1.0}), "explicit 'mu'"),
        (("scale_mixture", {"pi": 0.0}), r"pi must be a number in \(0, 1\)"),
        (("scale_mixture", {"pi": 1.0}), r"pi must be a number in \(0, 1\)"),
        (("scale_mixture", {"pi": 1.5}), r"pi must be a number in \(0, 1\)"),
        (("scale_mixture", {"pi": "0.5"}), r"pi must be a number in \(0, 1\)"),
        (("scale_mixture", {"sigma2": 0.0}), "sigma2 must be > 0"),
        (("gaussian", {"scale": 1.0}), "invalid arguments"),
        (("laplace", {"sigma": 1.0}), "invalid arguments"),
    ],
)
def test_invalid_prior_arguments(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        bnn.get_prior(spec, torch.zeros(2, 3))
    assert isinstance(info.value, InvalidArgumentError)


def test_unknown_kwarg_hint_names_the_prior():
    with pytest.raises(InvalidArgumentError) as info:
        bnn.get_prior(("laplace", {"sigma": 1.0}), torch.zeros(3))
    assert "'laplace'" in str(info.value) and "sigma" in str(info.value)


def test_unknown_prior_name():
    with pytest.raises(KeyError, match="Did you mean 'laplace'"):
        bnn.get_prior("laplase", torch.zeros(3))


# ---------------------------------------------------------------- densities


def _flat(prior, value, index=slice(None)):
    return prior.flat_log_prob(value.reshape(-1)[index], index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "spec",
    [
        ("gaussian", {"mu": 0.3, "sigma": 0.5}),
        ("gaussian", {"sigma": torch.tensor([0.5, 1.0, 2.0])}),
        "empirical_gaussian",
        ("laplace", {"mu": -0.2, "scale": 0.7}),
        ("laplace", {"scale": torch.tensor([[0.1], [1.0]])}),
        ("scale_mixture", {"pi": 0.25, "sigma1": 2.0, "sigma2": 0.1}),
        "scale_mixture",
    ],
)
def test_flat_log_prob_matches_distribution(spec, dtype):
    param = torch.randn(2, 3, dtype=dtype)
    prior = bnn.get_prior(spec, param)
    value = torch.randn(2, 3, dtype=dtype)
    expected = prior.distribution.log_prob(value).reshape(-1)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype is torch.float32 else {}
    torch.testing.assert_close(_flat(prior, value), expected, **tolerance)
    # A slice of the flattened elements, as the chunked KL evaluates them.
    torch.testing.assert_close(_flat(prior, value, slice(2, 5)), expected[2:5], **tolerance)


def test_scale_mixture_log_prob_is_the_mixture_density():
    prior = bnn.ScaleMixturePrior(shape=(5,), dtype=torch.float64, pi=0.3, sigma1=1.5, sigma2=0.2)
    value = torch.linspace(-2, 2, 5, dtype=torch.float64)
    density = (
        0.3 * Normal(0.0, 1.5).log_prob(value).exp() + 0.7 * Normal(0.0, 0.2).log_prob(value).exp()
    )
    torch.testing.assert_close(prior.distribution.log_prob(value), density.log())
    torch.testing.assert_close(_flat(prior, value), density.log())


def test_scale_mixture_with_tensor_scales():
    sigma1 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    prior = bnn.get_prior(("scale_mixture", {"sigma1": sigma1}), torch.zeros(2, 3).double())
    value = torch.randn(2, 3, dtype=torch.float64)
    log_prob = prior.distribution.log_prob(value)
    torch.testing.assert_close(log_prob.reshape(-1), _flat(prior, value))
    sigma2 = prior.sigma2
    first = Normal(0.0, sigma1).log_prob(value) + math.log(0.5)
    second = Normal(0.0, sigma2).log_prob(value) + math.log(0.5)
    torch.testing.assert_close(log_prob, torch.logaddexp(first, second))


def test_empirical_gaussian_is_centred_on_the_weights():
    param = torch.randn(3, 4)
    prior = bnn.get_prior(("empirical_gaussian", {"sigma": 0.2}), param)
    assert torch.equal(prior.distribution.mean, param)
    assert prior.mu.data_ptr() != param.data_ptr()
    torch.testing.assert_close(prior.distribution.stddev, torch.full((3, 4), 0.2))


# ---------------------------------------------------------------- closed forms


def _textbook_kl(mq, sq, mp, sp):
    return torch.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5


@pytest.mark.parametrize(
    ("prior_mu", "prior_sigma"),
    [(0.0, 1.0), (0.5, 0.1), (torch.linspace(-1, 1, 12).double(), torch.rand(12).double() + 0.1)],
)
def test_gaussian_kl_is_the_textbook_formula(prior_mu, prior_sigma):
    prior = bnn.GaussianPrior(shape=(12,), dtype=torch.float64, mu=prior_mu, sigma=prior_sigma)
    mq = torch.randn(12, dtype=torch.float64)
    sq = torch.rand(12, dtype=torch.float64) + 0.01
    mp = torch.as_tensor(prior_mu, dtype=torch.float64).expand(12)
    sp = torch.as_tensor(prior_sigma, dtype=torch.float64).expand(12)
    expected = _textbook_kl(mq, sq, mp, sp)
    torch.testing.assert_close(prior.gaussian_kl(mq, sq, slice(0, 12)), expected)
    torch.testing.assert_close(prior.gaussian_kl(mq[3:7], sq[3:7], slice(3, 7)), expected[3:7])
    torch.testing.assert_close(expected, kl_divergence(Normal(mq, sq), Normal(mp, sp)))


def test_gaussian_kl_is_zero_at_the_prior():
    prior = bnn.GaussianPrior(shape=(5,), dtype=torch.float64, mu=0.3, sigma=0.7)
    kl = prior.gaussian_kl(torch.full((5,), 0.3).double(), torch.full((5,), 0.7).double(), slice(5))
    assert kl.abs().max() < 1e-12


@pytest.mark.parametrize("spec", ["gaussian", ("gaussian", {"mu": 1.0, "sigma": 0.1}), "laplace"])
def test_closed_forms_are_non_negative(spec):
    prior = bnn.get_prior(spec, torch.zeros(10_000, dtype=torch.float64))
    mu = 3 * torch.randn(10_000, dtype=torch.float64)
    sigma = torch.exp(3 * torch.randn(10_000, dtype=torch.float64)).clamp(1e-6, 1e6)
    kl = prior.gaussian_kl(mu, sigma, slice(0, 10_000))
    assert torch.isfinite(kl).all() and (kl >= 0).all()


def test_laplace_kl_formula_matches_monte_carlo():
    loc, scale = 0.3, 0.8
    prior = bnn.LaplacePrior(shape=(6,), dtype=torch.float64, mu=loc, scale=scale)
    mu = torch.tensor([-2.0, -0.5, 0.0, 0.3, 0.9, 3.0], dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.5, 1.0, 2.0, 0.3, 1.5], dtype=torch.float64)
    closed = prior.gaussian_kl(mu, sigma, slice(0, 6))
    w = Normal(mu, sigma).sample((200_000,))
    terms = Normal(mu, sigma).log_prob(w) - Laplace(loc, scale).log_prob(w)
    error = terms.std(0) / math.sqrt(terms.shape[0])
    assert ((terms.mean(0) - closed).abs() < 4 * error).all()


def test_normal_laplace_pair_is_registered_with_torch():
    q = Normal(torch.tensor([0.5, -1.0]), torch.tensor([0.2, 1.0]))
    p = Laplace(torch.tensor(0.1), torch.tensor(2.0))
    expected = laplace_gaussian_kl(q.loc, q.scale, p.loc, p.scale)
    torch.testing.assert_close(kl_divergence(q, p), expected)


def test_scale_mixture_has_no_closed_form():
    prior = bnn.ScaleMixturePrior(shape=(3,))
    assert prior.gaussian_kl(torch.zeros(3), torch.ones(3), slice(0, 3)) is None


@pytest.mark.parametrize("spec", ["gaussian", "laplace", "empirical_gaussian", "scale_mixture"])
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_priors_accept_any_strides_and_store_contiguous_tensors(spec, layout):
    if layout == "channels_last":
        weight = torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last)
    else:
        weight = torch.randn(5, 7).t()
    prior = bnn.get_prior(spec, weight)
    assert all(t.is_contiguous() for t in prior.buffers())
    if spec == "empirical_gaussian":
        assert torch.equal(prior.mu, weight)
    tensor_prior = bnn.get_prior(("gaussian", {"mu": weight, "sigma": weight.abs() + 0.1}))
    assert tensor_prior.mu.is_contiguous() and tensor_prior.sigma.is_contiguous()


def test_the_broadcast_check_agrees_with_torch():
    from bnnify.bnn.priors import _broadcasts

    shapes = [(), (1,), (3,), (2, 1), (2, 3), (4, 2, 3), (1, 3), (3, 2), (0,), (1, 0)]
    for a, b in itertools.product(shapes, repeat=2):
        try:
            torch.broadcast_shapes(a, b)
            expected = True
        except RuntimeError:
            expected = False
        assert _broadcasts(a, b) is expected, (a, b)
