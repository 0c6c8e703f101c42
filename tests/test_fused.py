"""Tests of the compiled training step: agreement with the eager kernels, KL, noise, reuse."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fit_files import single_thread
from torch import nn

from bnnify.bnn import BayesianModule, kernels

CPU = torch.device("cpu")
needs_compiler = pytest.mark.skipif(
    kernels.compile_refusal(CPU) is not None,
    reason=f"torch.compile unavailable: {kernels.compile_refusal(CPU)}",
)
# Same maths, other order of operations and other vector math: float rounding only.


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():  # tiny models: extra threads only add waiting
        yield


TOLERANCE = {torch.float32: {"rtol": 2e-5, "atol": 2e-6}, torch.float64: {"rtol": 1e-10, "atol": 0}}


def _net(dtype=torch.float32, hidden: int = 40) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(dtype)


def _pair(dtype=torch.float32, hidden=40, **kwargs) -> tuple[BayesianModule, BayesianModule]:
    models = []
    for compile_kernels in (True, False):
        torch.manual_seed(0)  # the same network and the same initial posterior
        net = _net(dtype, hidden)
        models.append(BayesianModule(net, compile_kernels=compile_kernels, **kwargs))
    return models[0], models[1]


def _step(model: BayesianModule, x: torch.Tensor, seed: int = 1, passes: int = 1) -> tuple:
    """Output, KL and the gradients of mu and rho of one seeded training step."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = sum(model(x) for _ in range(passes)) / passes
    kl = model.kl_divergence()
    (out.square().sum() + kl / 50).backward()
    store = model.variational[0]
    return out.detach(), kl.detach(), store.mu.grad, store.rho.grad


def _assert_close(got: tuple, expected: tuple, dtype: torch.dtype) -> None:
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCE[dtype])


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_step_agrees_with_the_eager_step(dtype):
    compiled, eager = _pair(dtype)
    x = torch.randn(5, 6, dtype=dtype)
    _assert_close(_step(compiled, x), _step(eager, x), dtype)
    assert compiled.training_kernels() == ["compiled"]
    assert eager.training_kernels() == ["eager (compile_kernels=False)"]


@needs_compiler
def test_a_large_slot_is_read_in_place_and_small_ones_joined():
    compiled, eager = _pair(torch.float64, hidden=12_000)  # a first weight of 72,000 elements
    assert compiled._sampler.fused[0].runs == [(0, 1, 0), (1, 4, 0)]
    x = torch.randn(5, 6, dtype=torch.float64)
    _assert_close(_step(compiled, x), _step(eager, x), torch.float64)


@needs_compiler
def test_the_fused_kl_agrees_with_the_report():
    compiled, _ = _pair(torch.float64)
    compiled(torch.randn(2, 6, dtype=torch.float64))
    assert compiled._sampler.fused[0].take_kl() is not None  # the sample carries the KL
    kl = compiled.kl_divergence()
    report = sum(compiled.kl_by_parameter().values())
    torch.testing.assert_close(kl, report, rtol=1e-12, atol=0)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_kl_computed_before_the_sample_agrees_too(dtype):
    compiled, eager = _pair(dtype)
    x = torch.randn(5, 6, dtype=dtype)
    results = []
    for model in (compiled, eager):
        torch.manual_seed(1)
        kl = model.kl_divergence()  # before the forward pass: no sample carries it
        (model(x).square().sum() + kl / 50).backward()
        store = model.variational[0]
        results.append((kl.detach(), store.mu.grad, store.rho.grad))
    _assert_close(results[0], results[1], dtype)
    with torch.no_grad():
        torch.testing.assert_close(compiled.kl_divergence(), results[1][0], **TOLERANCE[dtype])


@needs_compiler
def test_the_compiled_kl_supports_double_backward():
    compiled, eager = _pair(torch.float64)
    results = []
    for model in (compiled, eager):
        store = model.variational[0]
        loss = model.kl_divergence().square()
        grads = torch.autograd.grad(loss, (store.mu, store.rho), create_graph=True)
        hvp = torch.autograd.grad(sum(g.square().sum() for g in grads), (store.mu, store.rho))
        results.append((*grads, *hvp))
    _assert_close(results[0], results[1], torch.float64)


@needs_compiler
def test_two_passes_before_one_backward_use_two_noise_buffers():
    compiled, eager = _pair(torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64)
    _assert_close(_step(compiled, x, passes=2), _step(eager, x, passes=2), torch.float64)
    shifted, _ = _pair(torch.float64, noise="shifted")
    for _ in range(3):  # the pool is not renewed while the first pass still needs it
        assert all(torch.isfinite(t).all() for t in _step(shifted, x, passes=2))


@needs_compiler
def test_compiled_steps_are_reproducible_under_a_seed():
    first, _ = _pair(noise="shifted")
    second = copy.deepcopy(first)
    x = torch.randn(5, 6)
    for _ in range(2):
        for a, b in zip(_step(first, x, seed=4), _step(second, x, seed=4), strict=True):
            assert torch.equal(a, b)  # the same code path, the same seed: bit for bit


@needs_compiler
def test_per_parameter_priors_each_get_their_kl():
    compiled, eager = _pair(torch.float64)
    for model in (compiled, eager):
        state = model.state_dict()
        state["priors.2.sigma"] = torch.tensor(0.3, dtype=torch.float64)
        state["priors.1.mu"] = torch.tensor(0.2, dtype=torch.float64)
        model.load_state_dict(state)  # four segments, three different priors
    assert len(compiled._divergence.segments[0]) == 4
    x = torch.randn(5, 6, dtype=torch.float64)
    _assert_close(_step(compiled, x), _step(eager, x), torch.float64)


@needs_compiler
def test_a_prior_without_a_fused_kl_keeps_the_compiled_sample():
    compiled, eager = _pair(torch.float64, prior=("laplace", {"scale": 0.5}))
    assert compiled._sampler.fused[0].priors is None
    x = torch.randn(5, 6, dtype=torch.float64)
    _assert_close(_step(compiled, x), _step(eager, x), torch.float64)


@needs_compiler
def test_shifted_noise_gradients_match_autograd_on_the_same_noise(monkeypatch):
    from bnnify.bnn.noise import ShiftedNoise

    shifts = []
    original = ShiftedNoise.step

    def recorded(self):
        shifts.append(original(self))
        return shifts[-1]

    monkeypatch.setattr(ShiftedNoise, "step", recorded)
    model, _ = _pair(torch.float64, noise="shifted")
    x = torch.randn(5, 6, dtype=torch.float64)
    _step(model, x)
    got = _step(model, x, seed=9)
    fused, store = model._sampler.fused[0], model.variational[0]
    offset, seed, _ = shifts[-1]
    eps = fused.shifted.eps(0, store.numel, offset, seed)
    mu = store.mu.detach().clone().requires_grad_()
    rho = store.rho.detach().clone().requires_grad_()
    w = store.split(mu + F.softplus(rho) * eps)
    reference = copy.deepcopy(_net(torch.float64))
    params = dict(zip(model.reparametrized_names(), w, strict=True))
    out = torch.func.functional_call(reference, params, (x,))
    q = torch.distributions.Normal(mu, F.softplus(rho))
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum()
    (out.square().sum() + kl / 50).backward()
    _assert_close(got, (out.detach(), kl.detach(), mu.grad, rho.grad), torch.float64)


@needs_compiler
def test_compiled_double_backward_matches_the_eager_one():
    compiled, eager = _pair(torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64)
    results = []
    for model in (compiled, eager):
        store = model.variational[0]
        torch.manual_seed(2)
        loss = (model(x).cos().sum() + model.kl_divergence() / 7).square()
        grads = torch.autograd.grad(loss, (store.mu, store.rho), create_graph=True)
        hvp = torch.autograd.grad(sum(g.square().sum() for g in grads), (store.mu, store.rho))
        results.append((*grads, *hvp))
    _assert_close(results[0], results[1], torch.float64)


@needs_compiler
def test_a_compiled_sample_backpropagated_twice_says_how_to_reuse_it():
    compiled, _ = _pair()
    loss = compiled(torch.randn(4, 6)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="frozen_sample"):
        loss.backward()


@needs_compiler
def test_the_fused_kl_is_not_reused_after_the_step():
    compiled, _ = _pair(torch.float64)
    optimizer = torch.optim.Adam(compiled.parameters(), lr=0.1, fused=True)
    x = torch.randn(5, 6, dtype=torch.float64)
    _step(compiled, x)
    optimizer.step()  # fused Adam changes mu and rho in place without bumping versions
    after = compiled.kl_divergence()
    report = sum(compiled.kl_by_parameter().values())
    torch.testing.assert_close(after, report, rtol=1e-12, atol=0)


@needs_compiler
def test_predictions_without_gradients_use_the_compiled_sample():
    compiled, eager = _pair(torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(3)
        got = compiled(x)
        torch.manual_seed(3)
        expected = eager(x)
    torch.testing.assert_close(got, expected, **TOLERANCE[torch.float64])


@needs_compiler
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")
def test_a_model_compiled_by_its_user_traces_the_eager_formulas():
    compiled, eager = _pair(torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64)
    forward, kl = torch.compile(compiled), torch.compile(compiled.kl_divergence)
    torch.manual_seed(1)
    out = forward(x)
    assert out.shape == (5, 3) and torch.isfinite(out).all()
    torch.testing.assert_close(kl(), eager.kl_divergence(), rtol=1e-10, atol=0)


@needs_compiler
def test_inference_mode_between_training_steps():
    compiled, eager = _pair(torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64)
    for model in (compiled, eager):
        with torch.inference_mode():
            model(x)  # the reused noise buffer is born here, and refilled outside
    _assert_close(_step(compiled, x), _step(eager, x), torch.float64)


@needs_compiler
def test_shifted_noise_gives_the_fresh_estimator_mean_and_spread(monkeypatch):
    from bnnify.bnn.noise import ShiftedNoise

    monkeypatch.setattr(ShiftedNoise, "MIN_POOL", 1)  # a pool of the model's size: worst case
    steps, x = 300, torch.randn(5, 6, dtype=torch.float64)
    moments = []
    for noise in ("fresh", "shifted"):
        model, _ = _pair(torch.float64, noise=noise)
        draws = torch.stack([torch.cat(_step(model, x, seed=1000 + t)[2:]) for t in range(steps)])
        moments.append((draws.mean(0), draws.var(0)))
    (mean_f, var_f), (mean_s, var_s) = moments
    z = (mean_s - mean_f).abs() / ((var_f + var_s) / steps).sqrt()
    assert float(z.mean()) < 1.0  # |N(0, 1)| has mean 0.80; a bias would raise it
    assert float((z > 4).double().mean()) < 0.01
    ratio = float((var_s / var_f).median())
    assert 0.85 < ratio < 1.15
