"""Tests of the estimator choice of `predict_samples`: the local trick only where proven."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bnnify.bnn as bnn
from bnnify.bnn.rowwise import Estimator, rowwise_refusal

LRT = Estimator.LOCAL_REPARAMETERIZATION
SAMPLES = 1000


class PerToken(nn.Module):
    """One MLP applied to each of `tokens` tokens: (B, T*d) -> (B*T, d) -> mean over T."""

    def __init__(self, tokens: int = 6, d: int = 4):
        super().__init__()
        self.tokens, self.d = tokens, d
        self.mlp = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x):
        out = self.mlp(x.reshape(-1, self.d))
        return out.reshape(x.shape[0], self.tokens, -1).mean(1)


class Center(nn.Module):
    """Subtracts the batch mean: each output row depends on every input row."""

    def forward(self, x):
        return x - x.mean(0)


class MySequential(nn.Sequential):
    pass


def _mlp(*middle: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), *middle, nn.Tanh(), nn.Linear(4, 2))


def _bnn(net: nn.Module, **kwargs) -> bnn.BayesianModule:
    return bnn.BayesianModule(net, ("pretrained_gaussian", {"sigma": 0.3}), **kwargs)


def _linears_only(net: nn.Module) -> list[str]:
    """Names of the parameters of `net`'s Linear layers (norms stay deterministic)."""
    return [
        f"{prefix}.{name}" if prefix else name
        for prefix, layer in net.named_modules()
        if type(layer) is nn.Linear
        for name, _ in layer.named_parameters()
    ]


def _weight_sampling(model, x, n):
    with torch.no_grad():
        return torch.stack([model(x) for _ in range(n)])


def _assert_same_distribution(fast, reference):
    """Per output: means within 5 standard errors, standard deviations within 5 too."""
    n = fast.shape[0]
    var = (fast.var(0) + reference.var(0)) / 2
    assert ((fast.mean(0) - reference.mean(0)).abs() < 5 * (2 * var / n).sqrt()).all()
    # The spread of a sample standard deviation is about sigma / sqrt(2 (n - 1)).
    ratio = fast.std(0) / reference.std(0)
    assert ((ratio - 1).abs() < 5 * math.sqrt(2 / (2 * (n - 1)))).all(), ratio


# ---------------------------------------------------------------- the per-token model


def test_a_per_token_model_gets_weight_sampling_and_its_full_spread():
    model = _bnn(PerToken())
    x = torch.randn(5, 24)
    choice = model.predictive_estimator(x)
    assert choice.estimator is Estimator.WEIGHT_SAMPLING
    assert "PerToken" in choice.reason and "row by row" in choice.reason
    fast = model.predict_samples(x, num_samples=SAMPLES)
    assert fast.shape == (SAMPLES, 5, 2)
    # The local trick gave each token its own noise: a spread ~40% too small here.
    _assert_same_distribution(fast, _weight_sampling(model, x, SAMPLES))


def test_the_explicit_opt_in_is_the_users_assertion():
    model = _bnn(PerToken(), local_reparameterization=True)
    choice = model.predictive_estimator(torch.randn(5, 24))
    assert choice.estimator is LRT and "asserts" in choice.reason


# ---------------------------------------------------------------- proven row-wise models


@pytest.mark.parametrize(
    "build",
    [
        lambda: _mlp(),
        lambda: nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.GELU()), nn.Linear(4, 2)),
        lambda: _mlp(nn.LayerNorm(4), nn.Dropout(0.0), nn.Flatten(), nn.Softmax(dim=-1)),
        lambda: _mlp(nn.BatchNorm1d(4).eval()),
        lambda: nn.Linear(3, 2),
    ],
    ids=["mlp", "nested", "norm-dropout-flatten-softmax", "eval-batchnorm", "linear"],
)
def test_row_wise_models_get_the_local_trick_with_the_same_distribution(build):
    net = build()
    model = _bnn(net, include=_linears_only(net))
    x = torch.randn(4, 3)
    choice = model.predictive_estimator(x)
    assert choice.estimator is LRT, choice.reason
    _assert_same_distribution(
        model.predict_samples(x, num_samples=SAMPLES), _weight_sampling(model, x, SAMPLES)
    )


@pytest.mark.parametrize("exclude", [None, "*.bias"], ids=["bayesian-bias", "fixed-bias"])
def test_an_mlp_with_a_deterministic_bias_keeps_the_trick(exclude):
    model = _bnn(_mlp(), exclude=exclude)
    x = torch.randn(4, 3)
    assert model.predictive_estimator(x).estimator is LRT
    fast = model.predict_samples(x, num_samples=SAMPLES)
    _assert_same_distribution(fast, _weight_sampling(model, x, SAMPLES))
    if exclude:
        # The deterministic bias shifts the mean: the samples are centred on it.
        with torch.no_grad(), model.mean_weights():
            centre = model(x)
        assert ((fast.mean(0) - centre).abs() < 0.5).all()


# ---------------------------------------------------------------- refusals


def _hooked():
    net = _mlp()
    net[2].register_forward_hook(lambda module, args, output: output - output.mean(0))
    return net


def _shared():
    shared = nn.Linear(4, 4)
    return nn.Sequential(nn.Linear(3, 4), shared, nn.Tanh(), shared)


REFUSALS = {
    "reshape": (PerToken, (5, 24), "PerToken is not a layer known to act row by row"),
    "row-mixing": (lambda: _mlp(Center()), (5, 3), "Center '1' is not a layer known"),
    "train-batchnorm": (lambda: _mlp(nn.BatchNorm1d(4)), (5, 3), "statistics of the batch"),
    "called-twice": (_shared, (5, 3), "Linear '3' is used twice"),
    "3-d": (_mlp, (5, 2, 3), "shape (5, 2, 3), not (batch, features)"),
    "softmax-dim-0": (lambda: _mlp(nn.Softmax(dim=0)), (5, 3), "dim=0, across rows"),
    "layernorm-2-d": (lambda: _mlp(nn.LayerNorm([5, 4])), (5, 3), "over (5, 4)"),
    "flatten-0": (lambda: nn.Sequential(nn.Flatten(0), nn.Linear(15, 2)), (5, 3), "merging"),
    "hook": (_hooked, (5, 3), "forward hooks"),
    "unflatten": (lambda: _mlp(nn.Unflatten(1, (2, 2)), nn.Flatten()), (5, 3), "Unflatten"),
    "subclass": (lambda: MySequential(nn.Linear(3, 2)), (5, 3), "subclass of nn.Sequential"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_structures_that_are_not_provably_row_wise_sample_weights(case):
    build, shape, match = REFUSALS[case]
    net = build()
    model = _bnn(net, include=_linears_only(net))
    x = torch.randn(shape)
    choice = model.predictive_estimator(x)
    assert choice.estimator is Estimator.WEIGHT_SAMPLING
    assert match in choice.reason
    samples = model.predict_samples(x, num_samples=3)
    assert samples.shape[0] == 3


def test_other_bayesian_parameters_sample_weights():
    model = _bnn(_mlp(nn.LayerNorm(4)))
    choice = model.predictive_estimator(torch.randn(5, 3))
    assert choice.estimator is Estimator.WEIGHT_SAMPLING
    assert "'1.weight' is not the weight or bias of a plain nn.Linear" in choice.reason


def test_several_inputs_are_refused():
    assert "2 inputs" in rowwise_refusal(_mlp(), [torch.zeros(2, 3), torch.zeros(2, 3)])


def test_modes_are_reported():
    model = _bnn(_mlp())
    x = torch.randn(5, 3)
    with model.mean_weights():
        assert model.predictive_estimator(x).estimator is Estimator.POSTERIOR_MEAN
        samples = model.predict_samples(x, num_samples=3)
        assert torch.equal(samples[0], samples[2])
    with model.frozen_sample():
        assert model.predictive_estimator(x).estimator is Estimator.FROZEN_SAMPLE
        samples = model.predict_samples(x, num_samples=3)
        assert torch.equal(samples[0], samples[2])
    assert str(model.predictive_estimator(x)).startswith("local_reparameterization (")


def test_several_inputs_or_keyword_arguments_are_not_proven_row_wise():
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    x = torch.zeros(5, 3)
    assert rowwise_refusal(mlp, [x]) is None
    assert rowwise_refusal(mlp, [x, x]) == "the model is given 2 inputs, not one tensor"
    assert rowwise_refusal(mlp, [x], {"sr": 16000}) == (
        "the model is given keyword arguments (sr), not one tensor"
    )
    assert rowwise_refusal(mlp, [x, 16000]) == "the model is given 2 inputs, not one tensor"
