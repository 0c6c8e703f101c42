"""Tests of in-place reparametrization, sampling modes and the local reparameterization trick."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnnify.bnn as bnn
from bnnify.bnn.posteriors import inverse_softplus
from bnnify.bnn.reparametrize import install_
from bnnify.errors import UsageError


def _linear_model(local=False, bias=True) -> bnn.BayesianModule:
    net = nn.Linear(3, 2, bias=bias).double()
    model = bnn.BayesianModule(net, local_reparameterization=local)
    with torch.no_grad():
        store = model.variational[0]
        store.mu.normal_()
        store.rho.copy_(inverse_softplus(torch.rand_like(store.rho) * 0.8 + 0.2))
    return model


def _weights(model: bnn.BayesianModule):
    """Means and variances of the weight and bias of a converted `nn.Linear(3, 2)`."""
    state = model.variational_state()
    sigma = {k: F.softplus(state[f"{k}.rho"]) for k in ("weight", "bias")}
    return state["weight.mu"], sigma["weight"] ** 2, state["bias.mu"], sigma["bias"] ** 2


# ---------------------------------------------------------------- installation


def test_reparametrized_layer_keeps_its_class_identity():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.LayerNorm(2))
    plain = nn.Linear(2, 2)
    model = bnn.BayesianModule(net)
    layer = net[0]
    assert isinstance(layer, nn.Linear) and type(layer) is not nn.Linear
    assert type(layer).__name__ == "Linear" and type(layer).__qualname__ == "Linear"
    assert type(net[1]) is type(layer)
    assert type(plain) is nn.Linear and not bnn.is_reparametrized(plain)
    assert bnn.is_reparametrized(layer) and bnn.is_reparametrized(layer, "bias")
    assert not bnn.is_reparametrized(layer, "in_features")
    assert not bnn.is_reparametrized(model) and not bnn.is_reparametrized(net)
    assert dict(layer.named_parameters()) == {}
    assert "weight" not in layer.state_dict()


def test_only_selected_attributes_are_properties():
    net = nn.Linear(3, 2)
    bias = net.bias
    bnn.BayesianModule(net, include="weight")
    assert bnn.is_reparametrized(net, "weight") and not bnn.is_reparametrized(net, "bias")
    assert net.bias is bias and isinstance(net.bias, nn.Parameter)


def test_reparametrized_attribute_cannot_be_assigned():
    net = nn.Linear(3, 2)
    bnn.BayesianModule(net)
    with pytest.raises(AttributeError, match="'weight' of Linear is reparametrized by bnnify"):
        net.weight = torch.zeros(2, 3)
    # nn.Module refuses a Parameter under a name that is already an attribute.
    with pytest.raises((AttributeError, KeyError), match="weight"):
        net.weight = nn.Parameter(torch.zeros(2, 3))
    assert bnn.is_reparametrized(net, "weight") and "weight" not in net._parameters


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
def test_torchscript_is_refused():
    scripted = torch.jit.script(nn.Linear(2, 2))
    with pytest.raises(UsageError, match="TorchScript"):
        bnn.BayesianModule(scripted)
    with pytest.raises(UsageError, match="TorchScript"):
        install_(scripted, "weight", None)


def test_reparametrized_layer_pickles_with_its_model():
    net = nn.Sequential(nn.Linear(3, 2))
    model = bnn.BayesianModule(net)
    clone = pickle.loads(pickle.dumps(model))
    layer = clone.module[0]
    assert type(layer).__name__ == "Linear" and bnn.is_reparametrized(layer, "weight")
    x = torch.randn(4, 3)
    with model.mean_weights(), clone.mean_weights():
        assert torch.equal(model(x), clone(x))


# ---------------------------------------------------------------- reads and modes


def test_reads_outside_forward_sample_each_time():
    model = _linear_model()
    layer = model.module
    assert not torch.equal(layer.weight, layer.weight)
    with model.mean_weights():
        weight = layer.weight
        assert torch.equal(weight, model.variational_state()["weight.mu"])
        assert torch.equal(weight, layer.weight)
    with model.frozen_sample():
        first = layer.weight
        assert torch.equal(first, layer.weight)
    assert not torch.equal(first, layer.weight)


def test_reads_inside_one_forward_see_one_sample():
    seen = []

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            seen.append((self.scale, self.scale))
            return x * self.scale

    model = bnn.BayesianModule(Twice())
    model(torch.ones(3))
    model(torch.ones(3))
    assert seen[0][0] is seen[0][1]
    assert not torch.equal(seen[0][0], seen[1][0])


def test_frozen_sample_is_fresh_per_context_and_differentiable():
    model = _linear_model()
    x = torch.randn(5, 3, dtype=torch.float64)
    with model.frozen_sample():
        first = model(x)
        first.sum().backward()
        second = model(x)
        second.sum().backward()
    assert torch.equal(first, second)
    grad = model.variational[0].mu.grad.clone()
    model.zero_grad()
    with model.frozen_sample():
        other = model(x)
        other.sum().backward()
    assert not torch.equal(first, other)
    assert torch.equal(grad[:6], 2 * model.variational[0].mu.grad[:6])


def test_mean_weights_pass_is_differentiable_in_mu_only():
    model = _linear_model()
    with model.mean_weights():
        model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    store = model.variational[0]
    assert (store.mu.grad != 0).all()
    assert store.rho.grad is None or not store.rho.grad.any()


def test_modes_nest_and_restore():
    model = _linear_model()
    x = torch.randn(2, 3, dtype=torch.float64)
    with model.frozen_sample():
        frozen = model(x)
        with model.mean_weights():
            mean = model(x)
        assert torch.equal(model(x), frozen)
    with model.mean_weights():
        assert torch.equal(model(x), mean)
    assert not torch.equal(model(x), model(x))


# ---------------------------------------------------------------- local reparameterization


def _draws(model, x, n):
    with torch.no_grad():
        return torch.stack([model(x) for _ in range(n)])


@pytest.mark.parametrize("how", ["argument", "context"])
def test_local_trick_matches_weight_sampling_moments(how):
    model = _linear_model(local=how == "argument")
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [3.0, 1.0, -1.0]], dtype=torch.float64)
    n = 4000
    if how == "context":
        with model.local_reparameterization():
            local = _draws(model, x, n)
        sampled = _draws(model, x, n)
    else:
        local = _draws(model, x, n)
        with model.local_reparameterization(False):
            sampled = _draws(model, x, n)
    mu_w, var_w, mu_b, var_b = _weights(model)
    mean = x @ mu_w.T + mu_b
    var = x.square() @ var_w.T + var_b
    for draws in (local, sampled):
        assert ((draws.mean(0) - mean).abs() < 4 * (var / n).sqrt()).all()
        assert ((draws.var(0) - var).abs() < 4 * var * math.sqrt(2 / (n - 1))).all()
    mean_error = (2 * var / n).sqrt()
    assert ((local.mean(0) - sampled.mean(0)).abs() < 4 * mean_error).all()
    var_error = var * math.sqrt(4 / (n - 1))
    assert ((local.var(0) - sampled.var(0)).abs() < 4 * var_error).all()


def test_local_trick_draws_each_row_independently():
    model = _linear_model(local=True)
    x = torch.ones(2, 3, dtype=torch.float64)
    local = model(x)
    assert not torch.equal(local[0], local[1])
    with model.local_reparameterization(False):
        sampled = model(x)
    assert torch.equal(sampled[0], sampled[1])


def _expected_loss_gradients(model, x, target):
    store = model.variational[0]
    mu = store.mu.detach().clone().requires_grad_()
    rho = store.rho.detach().clone().requires_grad_()
    sigma2 = F.softplus(rho).square()
    mean = x @ mu[:6].view(2, 3).T + mu[6:]
    var = x.square() @ sigma2[:6].view(2, 3).T + sigma2[6:]
    ((mean - target).square() + var).sum().backward()
    return mu.grad, rho.grad


def _gradient_draws(model, x, target, n):
    store = model.variational[0]
    grads = []
    for _ in range(n):
        store.mu.grad = store.rho.grad = None
        (model(x) - target).square().sum().backward()
        grads.append(torch.cat([store.mu.grad, store.rho.grad]))
    return torch.stack(grads)


def test_local_trick_expected_gradients_match():
    model = _linear_model()
    assert model.variational[0].names == ["weight", "bias"]
    x = torch.tensor([[1.0, -2.0, 0.5], [0.5, 0.0, 2.0]], dtype=torch.float64)
    target = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=torch.float64)
    expected = torch.cat(_expected_loss_gradients(model, x, target))
    n = 2000
    with model.local_reparameterization():
        local = _gradient_draws(model, x, target, n)
    sampled = _gradient_draws(model, x, target, n)
    for draws in (local, sampled):
        error = draws.std(0) / math.sqrt(n)
        assert ((draws.mean(0) - expected).abs() <= 4 * error + 1e-9).all()
    combined = (local.var(0) / n + sampled.var(0) / n).sqrt()
    assert ((local.mean(0) - sampled.mean(0)).abs() <= 4 * combined + 1e-9).all()


def test_local_trick_with_bias_free_layers_and_other_parameters():
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.LayerNorm(4), nn.Linear(4, 2))
    model = bnn.BayesianModule(net, local_reparameterization=True)
    x = torch.randn(6, 3)
    first = model(x)
    first.sum().backward()
    store = model.variational[0]
    assert all(store.mu.grad[a:b].abs().sum() > 0 for a, b in map(store.span, range(5)))
    assert not torch.equal(first, model(x))
    with model.mean_weights():
        assert torch.equal(model(x), model(x))
    with model.frozen_sample():
        assert torch.equal(model(x), model(x))


def test_local_trick_mean_weights_is_the_mean_network():
    model = _linear_model(local=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    mu_w, _, mu_b, _ = _weights(model)
    with model.mean_weights():
        torch.testing.assert_close(model(x), F.linear(x, mu_w, mu_b))


def test_local_trick_refuses_a_layer_called_twice():
    shared = nn.Linear(3, 3)
    model = bnn.BayesianModule(nn.Sequential(shared, nn.Tanh(), shared))
    x = torch.randn(2, 3)
    assert model(x).shape == (2, 3)
    with model.local_reparameterization(), pytest.raises(UsageError, match="called twice"):
        model(x)
    # The failed pass left no state behind.
    with model.local_reparameterization(False):
        assert model(x).shape == (2, 3)


@pytest.mark.parametrize("shape", [(2, 5, 3), (1, 1, 4, 3)])
def test_local_trick_falls_back_to_weight_sampling_beyond_2d(shape):
    model = _linear_model(local=True)
    x = torch.ones(shape, dtype=torch.float64)
    y = model(x)
    # Shared weights: identical input rows give identical outputs.
    assert (y == y.reshape(-1, 2)[0]).all()
    y.sum().backward()
    assert model.variational[0].rho.grad.abs().sum() > 0
    assert not torch.equal(y, model(x))


def test_local_trick_fallback_then_second_call_reuses_the_sample():
    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x.unsqueeze(0)).squeeze(0), self.fc(x)

    model = bnn.BayesianModule(TwoCalls(), local_reparameterization=True)
    x = torch.randn(4, 3)
    sampled, again = model(x)
    torch.testing.assert_close(sampled, again)


def test_one_dimensional_input_uses_the_trick():
    model = _linear_model(local=True)
    y = model(torch.ones(3, dtype=torch.float64))
    assert y.shape == (2,)
    y.sum().backward()
    assert model.variational[0].rho.grad.abs().sum() > 0
