"""Tests of KL(posterior || prior): closed forms, Monte Carlo, reductions, gradients."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical, MixtureSameFamily, Normal

import bnnify.bnn as bnn
from bnnify.bnn import kl_training as kl_module
from bnnify.bnn.kl_training import Segment, store_kl
from bnnify.bnn.posteriors import inverse_softplus

CLOSED_FORM_PRIORS = [
    "gaussian",
    ("normal", {"mu": 0.2, "sigma": 0.5}),
    ("empirical_gaussian", {"sigma": 0.3}),
    "laplace",
    ("laplace", {"mu": -0.1, "scale": 0.2}),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def textbook_kl(mq, sq, mp, sp):
    """KL(N(mq, sq^2) || N(mp, sp^2)), elementwise, written out by hand."""
    return torch.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5


def _net(dtype=torch.float64) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _randomize_(model: bnn.BayesianModule, spread: float = 1.0) -> None:
    """Random posteriors: means anywhere, scales from 1e-2 to 1e1."""
    with torch.no_grad():
        for store in model.variational:
            store.mu.normal_(0.0, spread)
            store.rho.copy_(
                inverse_softplus(torch.exp(torch.empty_like(store.rho).uniform_(-4, 2)))
            )


def _flat(model: bnn.BayesianModule):
    store = model.variational[0]
    return store.mu, F.softplus(store.rho)


def _mc(model, repeats, samples, expect_warning=True):
    """Repeated Monte Carlo estimates: their mean and standard error."""
    context = pytest.warns(UserWarning) if expect_warning else warnings.catch_warnings()
    with context:
        if not expect_warning:
            warnings.simplefilter("error")
        values = torch.stack(
            [model.kl_divergence(approx_num_samples=samples).detach() for _ in range(repeats)]
        ).double()
    return values.mean(), values.std() / math.sqrt(repeats)


# ---------------------------------------------------------------- closed form


@pytest.mark.parametrize(
    ("mu", "sigma"), [(0.0, 1.0), (0.3, 0.1), (-1.0, 2.5)], ids=["std", "narrow", "wide"]
)
def test_module_kl_is_the_textbook_formula(mu, sigma):
    model = bnn.BayesianModule(_net(), prior=("gaussian", {"mu": mu, "sigma": sigma}))
    _randomize_(model)
    mq, sq = _flat(model)
    mp = torch.tensor(mu, dtype=torch.float64)
    sp = torch.tensor(sigma, dtype=torch.float64)
    expected = textbook_kl(mq, sq, mp, sp)
    kl = model.kl_divergence()
    assert kl.dtype == torch.float64 and kl.shape == ()
    torch.testing.assert_close(kl, expected.sum(), rtol=1e-12, atol=1e-12)
    # Per parameter, the same formula over that parameter's elements.
    by_name = model.kl_by_parameter()
    assert list(by_name) == model.reparametrized_names()
    store = model.variational[0]
    for index, name in enumerate(store.names):
        start, end = store.span(index)
        torch.testing.assert_close(by_name[name], expected[start:end].sum().detach())
    # And the prior's own elementwise kernel agrees element by element.
    prior = model.priors[0]
    elementwise = prior.gaussian_kl(mq.detach(), sq.detach(), slice(0, mq.numel()))
    torch.testing.assert_close(elementwise, expected.detach(), rtol=1e-12, atol=1e-12)


def test_tensor_valued_priors_use_their_own_elements(monkeypatch):
    # Two same-shape parameters with an elementwise prior: each slot must read its own
    # prior elements, also when chunks split the slots (tiny CHUNK).
    monkeypatch.setattr(kl_module, "CHUNK", 4)
    net = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)).double()
    mp = torch.randn(3, 3, dtype=torch.float64)
    sp = torch.rand(3, dtype=torch.float64) + 0.2
    model = bnn.BayesianModule(net, prior=("gaussian", {"mu": mp, "sigma": sp}))
    _randomize_(model)
    mq, sq = _flat(model)
    expected = textbook_kl(mq.view(2, 3, 3), sq.view(2, 3, 3), mp, sp.expand(3, 3))
    torch.testing.assert_close(model.kl_divergence(), expected.sum(), rtol=1e-12, atol=1e-12)
    by_name = model.kl_by_parameter()
    torch.testing.assert_close(by_name["0.weight"], expected[0].sum().detach())
    torch.testing.assert_close(by_name["1.weight"], expected[1].sum().detach())


@pytest.mark.parametrize("chunk", [5, 1 << 16])
def test_chunked_kl_and_gradient_match_the_formula(monkeypatch, chunk):
    monkeypatch.setattr(kl_module, "CHUNK", chunk)
    model = bnn.BayesianModule(_net(), prior=("gaussian", {"sigma": 0.7}))
    _randomize_(model)
    store = model.variational[0]
    kl = model.kl_divergence()
    kl.backward()
    mu = store.mu.detach().clone().requires_grad_()
    rho = store.rho.detach().clone().requires_grad_()
    expected = textbook_kl(
        mu, F.softplus(rho), torch.tensor(0.0).double(), torch.tensor(0.7).double()
    )
    expected.sum().backward()
    torch.testing.assert_close(kl.detach(), expected.sum().detach())
    torch.testing.assert_close(store.mu.grad, mu.grad)
    torch.testing.assert_close(store.rho.grad, rho.grad)


@pytest.mark.parametrize("spec", CLOSED_FORM_PRIORS)
def test_kl_is_non_negative_for_random_posteriors(spec):
    model = bnn.BayesianModule(_net(), "pretrained_gaussian", spec)
    for spread in (0.01, 1.0, 5.0):
        _randomize_(model, spread)
        by_name = model.kl_by_parameter()
        assert all(value >= 0 for value in by_name.values())
        assert model.kl_divergence() >= 0


@pytest.mark.parametrize("spec", CLOSED_FORM_PRIORS)
def test_kl_on_the_chosen_device_and_dtype(spec, device, dtype):
    """`pytest --device cuda --dtype float64` checks the kernels there against float64 CPU."""
    model = bnn.BayesianModule(_net(torch.float32), "pretrained_gaussian", spec).to(device, dtype)
    _randomize_(model)
    kl = model.kl_divergence()
    assert (kl.device.type, kl.dtype) == (device.type, dtype) and kl >= 0
    reference = copy.deepcopy(model).to("cpu", torch.float64)
    rtol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 2e-2)
    expected = float(reference.kl_divergence().detach())
    assert kl.item() == pytest.approx(expected, rel=rtol)
    kl.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.variational_parameters())


def test_kl_is_zero_on_the_chosen_device_when_the_posterior_is_the_prior(device, dtype):
    prior = ("gaussian", {"mu": 0.25, "sigma": 0.5})
    model = bnn.BayesianModule(_net(torch.float32), prior=prior).to(device, dtype)
    with torch.no_grad():
        model.variational[0].mu.fill_(0.25)
        model.variational[0].rho.copy_(
            inverse_softplus(torch.full_like(model.variational[0].rho, 0.5))
        )
    atol = {torch.float64: 1e-12, torch.float32: 1e-4}.get(dtype, 1e-1)
    assert abs(model.kl_divergence().item()) < atol


def test_scale_mixture_kl_is_positive_for_random_posteriors():
    model = bnn.BayesianModule(_net(), prior="scale_mixture")
    _randomize_(model)
    assert model.kl_divergence(approx_num_samples=64) > 0


@pytest.mark.parametrize(("mu", "sigma"), [(0.0, 1.0), (0.25, 0.5), (-2.0, 3.0)])
def test_kl_is_zero_when_the_posterior_is_the_prior(mu, sigma):
    model = bnn.BayesianModule(_net(), prior=("gaussian", {"mu": mu, "sigma": sigma}))
    with torch.no_grad():
        model.variational[0].mu.fill_(mu)
        model.variational[0].rho.copy_(
            inverse_softplus(torch.full_like(model.variational[0].rho, sigma))
        )
    assert abs(model.kl_divergence().item()) < 1e-12
    assert all(abs(v.item()) < 1e-12 for v in model.kl_by_parameter().values())


def test_empirical_prior_with_pretrained_posterior_has_no_mean_term():
    net = _net()
    model = bnn.BayesianModule(
        net, ("pretrained_gaussian", {"sigma": 0.05}), ("empirical_gaussian", {"sigma": 0.2})
    )
    _, sq = _flat(model)
    sp = torch.tensor(0.2, dtype=torch.float64)
    no_mean_term = torch.log(sp / sq) + sq**2 / (2 * sp**2) - 0.5
    kl = model.kl_divergence()
    torch.testing.assert_close(kl, no_mean_term.sum(), rtol=1e-12, atol=1e-12)
    kl.backward()
    assert torch.equal(model.variational[0].mu.grad, torch.zeros_like(model.variational[0].mu))
    assert (model.variational[0].rho.grad != 0).all()


def test_empirical_prior_at_the_posterior_gives_zero():
    model = bnn.BayesianModule(
        _net(), ("pretrained_gaussian", {"sigma": 0.2}), ("empirical_gaussian", {"sigma": 0.2})
    )
    assert abs(model.kl_divergence().item()) < 1e-12


# ---------------------------------------------------------------- reductions


@pytest.mark.parametrize("spec", ["gaussian", "laplace"])
def test_mean_reduction_is_sum_over_numel(spec):
    model = bnn.BayesianModule(_net(), prior=spec)
    total = model.kl_divergence(reduction="sum")
    numel = sum(p.numel() for p in _net().parameters())
    assert model.num_variational_elements == numel
    torch.testing.assert_close(model.kl_divergence(reduction="mean"), total / numel)
    torch.testing.assert_close(model.kl_divergence(reduction="Mean"), total / numel)
    torch.testing.assert_close(model.kl_divergence(reduction="SUM"), total)
    torch.testing.assert_close(model.kl_divergence(), total)


@pytest.mark.parametrize("reduction", ["none", "", "avg", None, 1, "sum "])
def test_bad_reduction_raises_value_error(reduction):
    model = bnn.BayesianModule(_net())
    with pytest.raises(ValueError, match="invalid reduction") as info:
        model.kl_divergence(reduction=reduction)
    assert "'sum' or 'mean'" in str(info.value)


@pytest.mark.parametrize("samples", [0, -3, 2.5, True, "8"])
def test_bad_sample_count_raises_value_error(samples):
    model = bnn.BayesianModule(_net())
    with pytest.raises(ValueError, match="positive integer"):
        model.kl_divergence(approx_num_samples=samples)


# ---------------------------------------------------------------- Monte Carlo


@pytest.mark.parametrize("spec", CLOSED_FORM_PRIORS)
def test_monte_carlo_agrees_with_the_closed_form(spec):
    model = bnn.BayesianModule(_net(), "pretrained_gaussian", spec)
    _randomize_(model, 0.5)
    analytic = model.kl_divergence().detach()
    mean, error = _mc(model, repeats=40, samples=8)
    assert abs(mean - analytic) < 4 * error, (mean, analytic, error)


def test_monte_carlo_where_a_closed_form_exists_warns_at_the_call_site():
    model = bnn.BayesianModule(_net())
    with pytest.warns(UserWarning, match="closed-form KL divergence exists") as record:
        kl = model.kl_divergence(approx_num_samples=4)
    assert torch.isfinite(kl)
    assert record[0].filename == __file__


def test_closed_form_does_not_warn():
    model = bnn.BayesianModule(_net(), prior="laplace")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.kl_divergence()


def test_scale_mixture_needs_samples():
    model = bnn.BayesianModule(_net(), prior="scale_mixture")
    with pytest.raises(ValueError, match="approx_num_samples") as info:
        model.kl_divergence()
    assert "ScaleMixturePrior" in str(info.value)


@pytest.mark.parametrize(
    "kwargs", [{}, {"pi": 0.25, "sigma1": 1.5, "sigma2": 0.05}], ids=["default", "custom"]
)
def test_scale_mixture_monte_carlo_matches_brute_force(kwargs):
    model = bnn.BayesianModule(_net(), prior=("scale_mixture", kwargs))
    _randomize_(model, 0.3)
    mean, error = _mc(model, repeats=30, samples=16, expect_warning=False)
    pi = kwargs.get("pi", 0.5)
    scales = torch.tensor([kwargs.get("sigma1", 1.0), kwargs.get("sigma2", math.exp(-6))])
    prior = MixtureSameFamily(
        Categorical(torch.tensor([pi, 1 - pi]).double()),
        Normal(torch.zeros(2).double(), scales.double()),
    )
    mq, sq = _flat(model)
    q = Normal(mq.detach(), sq.detach())
    draws = 4000
    w = q.sample((draws,))
    per_draw = (q.log_prob(w) - prior.log_prob(w.unsqueeze(-1)).squeeze(-1)).sum(1)
    brute_error = per_draw.std() / math.sqrt(draws)
    assert abs(mean - per_draw.mean()) < 4 * math.hypot(error, brute_error)


@pytest.mark.parametrize("spec", ["gaussian", "laplace", "scale_mixture"])
def test_monte_carlo_gradient_is_the_derivative_of_the_estimate(spec):
    # With the global seed fixed, one estimate is a deterministic function of (mu, rho):
    # its backward pass must differentiate exactly the samples of its forward pass.
    prior = bnn.get_prior(spec, shape=(3000,), dtype=torch.float64)
    segments = [Segment(0, 1000, prior, 0), Segment(1000, 3000, prior, 0)]
    mu = torch.randn(3000, dtype=torch.float64, requires_grad=True)
    rho = (torch.rand(3000, dtype=torch.float64) - 3).requires_grad_()

    def estimate(m, r):
        torch.manual_seed(123)
        return store_kl(m, r, segments, 4)

    grad_mu, grad_rho = torch.autograd.grad(estimate(mu, rho), (mu, rho))
    step = 1e-6
    for grad, which in ((grad_mu, 0), (grad_rho, 1)):
        direction = torch.randn(3000, dtype=torch.float64)
        args_plus = [mu.detach(), rho.detach()]
        args_minus = [mu.detach(), rho.detach()]
        args_plus[which] = args_plus[which] + step * direction
        args_minus[which] = args_minus[which] - step * direction
        numeric = (estimate(*args_plus) - estimate(*args_minus)) / (2 * step)
        torch.testing.assert_close(numeric, (grad * direction).sum(), rtol=1e-5, atol=1e-6)


def test_monte_carlo_estimates_differ_between_calls():
    model = bnn.BayesianModule(_net(), prior="scale_mixture")
    first = model.kl_divergence(approx_num_samples=2)
    assert first != model.kl_divergence(approx_num_samples=2)


# ---------------------------------------------------------------- gradients and dtypes


@pytest.mark.parametrize(
    ("spec", "samples"),
    [("gaussian", None), ("gaussian", 8), ("laplace", None), ("laplace", 8), ("scale_mixture", 8)],
)
def test_kl_gradient_reaches_mu_and_rho(spec, samples):
    model = bnn.BayesianModule(_net(torch.float32), prior=spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kl = model.kl_divergence(approx_num_samples=samples)
    kl.backward()
    names = {name for name, _ in model.named_parameters()}
    assert names == {"variational.0.mu", "variational.0.rho"}
    store = model.variational[0]
    assert store.mu.grad.abs().sum() > 0 and store.rho.grad.abs().sum() > 0
    assert torch.isfinite(store.mu.grad).all() and torch.isfinite(store.rho.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", ["gaussian", "laplace"])
def test_kl_dtype_follows_kl_meta(spec, dtype):
    model = bnn.BayesianModule(_net(dtype), prior=spec)
    assert model._kl_meta.dtype == dtype
    kl = model.kl_divergence()
    assert kl.dtype == dtype and torch.isfinite(kl)
    reference = bnn.BayesianModule(_net(dtype), prior=spec)
    reference.load_state_dict(model.state_dict())
    reference.double()
    assert reference._kl_meta.dtype == torch.float64
    expected = reference.kl_divergence()
    assert expected.dtype == torch.float64
    # bfloat16 rounds the variational parameters and the result, not the accumulation.
    rtol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(kl.double(), expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_kl_dtype_argument_and_to(dtype):
    model = bnn.BayesianModule(_net(torch.float32), dtype=dtype, device="cpu")
    assert model.kl_divergence().dtype == dtype
    model.to(torch.float32)
    assert model.kl_divergence().dtype == torch.float32
    assert model.variational[0].mu.dtype == torch.float32


def test_mixed_dtype_model_sums_both_stores():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())
    model = bnn.BayesianModule(net, prior=("gaussian", {"sigma": 0.5}))
    assert [s.mu.dtype for s in model.variational] == [torch.float32, torch.float64]
    expected = 0
    for store in model.variational:
        mq, sq = store.mu.double(), F.softplus(store.rho.double())
        expected = (
            expected
            + textbook_kl(mq, sq, torch.tensor(0.0).double(), torch.tensor(0.5).double()).sum()
        )
    kl = model.kl_divergence()
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, expected.float())
    kl.backward()
    assert all(s.rho.grad is not None for s in model.variational)


def test_kl_under_no_grad():
    model = bnn.BayesianModule(_net())
    with torch.no_grad():
        kl = model.kl_divergence()
    assert not kl.requires_grad
    torch.testing.assert_close(kl, model.kl_divergence().detach())


def test_fused_gaussian_kl_across_chunk_boundaries(monkeypatch):
    from bnnify.bnn import kl_training as kl_module

    monkeypatch.setattr(kl_module, "FAST_CHUNK", 5)
    net = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Linear(7, 3)).double()
    model = bnn.BayesianModule(net, prior=("gaussian", {"mu": 0.2, "sigma": 0.7}))
    store = model.variational[0]
    with torch.no_grad():
        store.rho.uniform_(-4, 1)
    kl = model.kl_divergence()
    q = torch.distributions.Normal(store.mu, torch.nn.functional.softplus(store.rho))
    p = torch.distributions.Normal(torch.tensor(0.2).double(), torch.tensor(0.7).double())
    expected = torch.distributions.kl_divergence(q, p).sum()
    torch.testing.assert_close(kl, expected)
    got = torch.autograd.grad(kl, (store.mu, store.rho))
    want = torch.autograd.grad(expected, (store.mu, store.rho))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- second derivatives


def _kl_gradient(model, samples, create_graph):
    store = model.variational[0]
    torch.manual_seed(5)  # the same Monte Carlo noise in every call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kl = model.kl_divergence(approx_num_samples=samples)
    return torch.autograd.grad(kl, (store.mu, store.rho), create_graph=create_graph)


@pytest.mark.parametrize(
    ("spec", "samples"),
    [
        ("gaussian", None),
        (("gaussian", {"mu": 0.2, "sigma": 0.5}), None),
        ("laplace", None),
        ("laplace", 4),
        ("scale_mixture", 4),
    ],
)
def test_kl_hessian_vector_product_matches_finite_differences(spec, samples):
    # Double backward through the fused kernels: curvature, not detached first gradients.
    model = bnn.BayesianModule(_net(), prior=spec)
    _randomize_(model, 0.5)
    store = model.variational[0]
    g_mu, g_rho = _kl_gradient(model, samples, create_graph=True)
    assert g_mu.requires_grad and g_rho.requires_grad
    v_mu, v_rho = torch.randn_like(store.mu), torch.randn_like(store.rho)
    h_mu, h_rho = torch.autograd.grad(
        (g_mu * v_mu).sum() + (g_rho * v_rho).sum(), (store.mu, store.rho)
    )
    step = 1e-6
    with torch.no_grad():
        store.mu.add_(step * v_mu)
        store.rho.add_(step * v_rho)
    plus = _kl_gradient(model, samples, create_graph=False)
    with torch.no_grad():
        store.mu.sub_(2 * step * v_mu)
        store.rho.sub_(2 * step * v_rho)
    minus = _kl_gradient(model, samples, create_graph=False)
    numeric = [(p - m) / (2 * step) for p, m in zip(plus, minus, strict=True)]
    torch.testing.assert_close(h_mu, numeric[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_rho, numeric[1], rtol=1e-5, atol=1e-6)
