"""Tests of the flat Gaussian store and its fused sampling kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bnnify.bnn.store import GaussianStore, gaussian_sample
from bnnify.errors import FormatError

SHAPES = [torch.Size([2, 3]), torch.Size([3]), torch.Size([]), torch.Size([1, 2, 2])]


def _store(dtype=torch.float64) -> GaussianStore:
    names = ["a.weight", "a.bias", "scale", "conv.weight"]
    store = GaussianStore(names, SHAPES, dtype, torch.device("cpu"))
    with torch.no_grad():
        store.mu.copy_(torch.randn(store.numel, dtype=dtype))
        store.rho.copy_(torch.randn(store.numel, dtype=dtype) - 2)
    return store


def test_layout():
    store = _store()
    assert store.numel == 6 + 3 + 1 + 4 == store.mu.numel() == store.rho.numel()
    assert store.offsets == [0, 6, 9, 10, 14]
    assert [store.span(i) for i in range(4)] == [(0, 6), (6, 9), (9, 10), (10, 14)]
    assert [n for n, _ in store.named_parameters()] == ["mu", "rho"]
    assert "slots=4" in repr(store) and "numel=14" in repr(store)


def test_view_and_split_agree():
    store = _store()
    mu = torch.arange(14, dtype=torch.float64)
    with torch.no_grad():
        store.mu.copy_(mu)
    assert torch.equal(store.view(store.mu, 1), mu[6:9])
    assert store.view(store.mu, 1).data_ptr() == store.mu[6:].data_ptr()
    parts = store.split(store.mu.detach())
    assert [p.shape for p in parts] == SHAPES
    for index, part in enumerate(parts):
        assert torch.equal(part, store.view(store.mu.detach(), index))
    tail = store.split(store.mu.detach()[9:], first=2)
    assert [p.shape for p in tail] == SHAPES[2:]
    assert torch.equal(tail[1], parts[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sample_with_given_noise(dtype):
    store = _store(dtype)
    eps = store.noise()
    assert eps.shape == (14,) and eps.dtype == dtype
    mu, rho = store.mu.double(), store.rho.double()
    expected = (mu + F.softplus(rho) * eps.double()).to(dtype)
    # bfloat16 rounds the intermediate product too.
    tolerance = {"rtol": 1e-2, "atol": 1e-2} if dtype is torch.bfloat16 else {}
    torch.testing.assert_close(store.sample(eps=eps), expected, **tolerance)
    torch.testing.assert_close(store.sample(6, 10, eps[6:10]), expected[6:10], **tolerance)
    torch.testing.assert_close(store.sigma(6, 10), F.softplus(store.rho[6:10]))
    assert store.sample(3, 5).shape == (2,)
    assert not torch.equal(store.sample(), store.sample())


def test_sample_gradient_matches_autograd():
    mu = torch.randn(20, dtype=torch.float64, requires_grad=True)
    rho = torch.randn(20, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(20, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m, r: gaussian_sample(m, r, eps), (mu, rho))
    weights = torch.randn(20, dtype=torch.float64)
    fused = torch.autograd.grad((gaussian_sample(mu, rho, eps) * weights).sum(), (mu, rho))
    plain = torch.autograd.grad(((mu + F.softplus(rho) * eps) * weights).sum(), (mu, rho))
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b)


def test_sample_gradient_reaches_the_slice_only():
    store = _store()
    store.sample(6, 9).sum().backward()
    assert (store.mu.grad[6:9] == 1).all()
    assert (store.mu.grad[:6] == 0).all() and (store.mu.grad[9:] == 0).all()
    assert (store.rho.grad[6:9] != 0).all() and (store.rho.grad[9:] == 0).all()


def test_extra_state_round_trip():
    store = _store()
    other = GaussianStore(store.names, store.shapes, torch.float64, torch.device("cpu"))
    other.load_state_dict(store.state_dict())
    assert torch.equal(other.mu, store.mu) and torch.equal(other.rho, store.rho)
    assert store.layout() == {"names": store.names, "shapes": [[2, 3], [3], [], [1, 2, 2]]}
    assert all(isinstance(v, torch.Tensor) for v in store.state_dict().values())


def test_a_layout_saved_as_a_dict_still_loads():
    store = _store()
    state = dict(store.state_dict())
    state["_extra_state"] = store.layout()
    other = GaussianStore(store.names, store.shapes, torch.float64, torch.device("cpu"))
    other.load_state_dict(state)
    assert torch.equal(other.mu, store.mu)


@pytest.mark.parametrize(
    ("names", "shapes", "match"),
    [
        (["a.weight", "a.bias", "scale", "other"], SHAPES, "differing: \\['conv.weight', 'other'"),
        (
            ["a.weight", "a.bias", "scale", "conv.weight"],
            [*SHAPES[:3], torch.Size([4])],
            "shapes or order",
        ),
        (
            ["a.bias", "a.weight", "scale", "conv.weight"],
            [SHAPES[1], SHAPES[0], *SHAPES[2:]],
            "shapes or order",
        ),
    ],
)
def test_extra_state_mismatch_raises_format_error(names, shapes, match):
    store = _store()
    other = GaussianStore(names, shapes, torch.float64, torch.device("cpu"))
    with pytest.raises(FormatError, match=match) as info:
        other.load_state_dict(store.state_dict())
    assert "same architecture" in info.value.hint


@pytest.mark.parametrize(
    "state",
    [
        None,
        [],
        {"names": []},
        {"shapes": []},
        torch.zeros(3),
        torch.tensor([255, 0], dtype=torch.uint8),
        torch.frombuffer(bytearray(b"[1, 2]"), dtype=torch.uint8),
    ],
)
def test_malformed_extra_state(state):
    with pytest.raises(FormatError, match="malformed"):
        _store().set_extra_state(state)


def test_sigma_cache_does_not_outlive_a_fused_adam_step():
    from torch import nn

    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    from bnnify.bnn import BayesianModule

    model = BayesianModule(net)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5, fused=True)
    x = torch.randn(5, 4)
    (model(x).sum() + model.kl_divergence()).backward()
    optimizer.step()  # fused Adam changes rho in place without bumping its version
    store = model.variational[0]
    kl = model.kl_divergence()
    q = torch.distributions.Normal(store.mu.detach(), torch.nn.functional.softplus(store.rho))
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum()
    torch.testing.assert_close(kl.double(), expected.double(), rtol=1e-5, atol=1e-4)
    # Forward, KL first then backward: the cache serves once and is gone after.
    model(x)
    assert store.cached_sigma() is not None
    model.kl_divergence()
    assert store.cached_sigma() is None


def test_chunked_sample_backward_matches_autograd(monkeypatch):
    from bnnify.bnn import store as store_module

    monkeypatch.setattr(store_module, "_CHUNK", 7)
    mu = torch.randn(50, dtype=torch.float64, requires_grad=True)
    rho = torch.randn(50, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(50, dtype=torch.float64)
    grad = torch.randn(50, dtype=torch.float64)
    fused = torch.autograd.grad(store_module.gaussian_sample(mu, rho, eps), (mu, rho), grad)
    plain = torch.autograd.grad(mu + torch.nn.functional.softplus(rho) * eps, (mu, rho), grad)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b)


def test_a_sample_backpropagated_twice_says_how_to_reuse_it():
    from bnnify.bnn import BayesianModule

    model = BayesianModule(torch.nn.Linear(3, 2))
    x = torch.randn(4, 3)
    loss = model(x).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="frozen_sample"):
        loss.backward()
    with model.frozen_sample():  # the frozen noise is not consumed: twice is fine
        frozen = model(x).sum()
        frozen.backward(retain_graph=True)
        frozen.backward()


# ---------------------------------------------------------------- second derivatives


def _reference_second_derivatives(mu, rho, eps, loss):
    """Gradient and Hessian-vector product of loss(mu + softplus(rho) eps), plain autograd."""
    mu = mu.detach().clone().requires_grad_()
    rho = rho.detach().clone().requires_grad_()
    w = mu + F.softplus(rho) * eps
    grads = torch.autograd.grad(loss(w), (mu, rho), create_graph=True)
    return grads, torch.autograd.grad(sum(g.square().sum() for g in grads), (mu, rho))


@pytest.mark.parametrize("how", ["owned", "given", "slice"])
def test_the_sampler_supports_double_backward(how):
    store = _store()
    eps = torch.randn(store.numel, dtype=torch.float64)
    if how == "owned":
        w = gaussian_sample(store.mu, store.rho, eps.clone(), store, owned=True)
    elif how == "given":
        w = gaussian_sample(store.mu, store.rho, eps)
    else:
        w = torch.cat([store.sample(0, 6, eps[:6]), store.sample(6, store.numel, eps[6:])])

    def loss(weights):
        return (weights.cos() * weights.square()).sum()

    grads = torch.autograd.grad(loss(w), (store.mu, store.rho), create_graph=True)
    hvp = torch.autograd.grad(sum(g.square().sum() for g in grads), (store.mu, store.rho))
    expected_grads, expected_hvp = _reference_second_derivatives(store.mu, store.rho, eps, loss)
    for got, expected in zip((*grads, *hvp), (*expected_grads, *expected_hvp), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
