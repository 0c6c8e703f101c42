"""Tests of `BayesianModule`: conversion of every layer type, tying, state, dtypes, errors."""

from __future__ import annotations

import copy
import doctest
import importlib
import logging
import math

import pytest
import safetensors.torch as safetensors_torch
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import bnnify.bnn as bnn
from bnnify.errors import ArgumentTypeError, FormatError, UsageError

# ---------------------------------------------------------------- every layer type


class RawParameter(nn.Module):
    """A custom module using bare `nn.Parameter`s, with a keyword argument."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(3, 2))
        self.shift = nn.Parameter(torch.zeros(2))

    def forward(self, x, *, power: int = 1):
        return (x @ self.scale + self.shift) ** power


def _tokens():
    return torch.randint(0, 10, (2, 5))


LAYERS = {
    "Linear": (lambda: nn.Linear(3, 2), lambda: (torch.randn(4, 3),)),
    "Conv1d": (lambda: nn.Conv1d(2, 3, 3), lambda: (torch.randn(2, 2, 8),)),
    "Conv2d": (lambda: nn.Conv2d(2, 3, 3), lambda: (torch.randn(2, 2, 5, 5),)),
    "Conv3d": (lambda: nn.Conv3d(2, 3, 2), lambda: (torch.randn(2, 2, 4, 4, 4),)),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(3), lambda: (torch.randn(6, 3),)),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(3), lambda: (torch.randn(4, 3, 2, 2),)),
    "LSTM": (lambda: nn.LSTM(3, 4, batch_first=True), lambda: (torch.randn(2, 5, 3),)),
    "GRU": (lambda: nn.GRU(3, 4, num_layers=2), lambda: (torch.randn(5, 2, 3),)),
    "Embedding": (lambda: nn.Embedding(10, 4), lambda: (_tokens(),)),
    "MultiheadAttention": (
        lambda: nn.MultiheadAttention(8, 2, batch_first=True),
        lambda: (torch.randn(2, 5, 8),) * 3,
    ),
    "LayerNorm": (lambda: nn.LayerNorm(4), lambda: (torch.randn(2, 4),)),
    "TransformerEncoderLayer": (
        lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
        lambda: (torch.randn(2, 5, 8),),
    ),
    "RawParameter": (RawParameter, lambda: (torch.randn(4, 3),)),
}


def _output(result):
    """The first tensor of a layer's output (RNNs and attention return tuples)."""
    return result[0] if isinstance(result, tuple) else result


def _setup(kind: str, training: bool):
    make, inputs = LAYERS[kind]
    net = make().train(training)
    reference = copy.deepcopy(net)
    args = inputs()
    for arg in args:
        if arg.is_floating_point():
            arg.requires_grad_()
    model = bnn.BayesianModule(net)
    return net, reference, model, args


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_converts_and_trains(kind, training):
    net, _, model, args = _setup(kind, training)
    assert list(net.parameters()) == []
    assert {n for n, _ in model.named_parameters()} == {"variational.0.mu", "variational.0.rho"}
    assert model.training is training and net.training is training
    first = _output(model(*args))
    assert not torch.equal(first, _output(model(*args)))
    first.square().sum().backward()
    store = model.variational[0]
    for index, name in enumerate(store.names):
        start, end = store.span(index)
        assert store.mu.grad[start:end].abs().sum() > 0, name
        assert store.rho.grad[start:end].abs().sum() > 0, name
    for arg in args:
        if arg.is_floating_point():
            assert arg.grad.abs().sum() > 0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_modes_use_exactly_the_drawn_weights(kind, training):
    _, reference, model, args = _setup(kind, training)

    def plain(params):
        return _output(functional_call(reference, params, args))

    with model.mean_weights():
        mean = _output(model(*args))
        assert torch.equal(mean, _output(model(*args)))
        torch.testing.assert_close(mean, plain(model.sample_parameters()))
    torch.testing.assert_close(mean, plain(model.sample_parameters(mean=True)))
    with model.frozen_sample():
        frozen = _output(model(*args))
        assert torch.equal(frozen, _output(model(*args)))
        torch.testing.assert_close(frozen, plain(model.sample_parameters()))
    assert not torch.equal(frozen, mean)


def test_forward_passes_keyword_arguments():
    model = bnn.BayesianModule(RawParameter())
    x = torch.randn(4, 3)
    with model.mean_weights():
        torch.testing.assert_close(model(x, power=2), model(x) ** 2)


def test_eval_keeps_sampling_and_flags_follow():
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0), nn.Linear(3, 1)).eval()
    model = bnn.BayesianModule(net)
    assert not model.training and not net[0].training
    x = torch.randn(2, 3)
    assert not torch.equal(model(x), model(x))
    model.train()
    assert model.training and net[1].training
    assert bnn.BayesianModule(nn.Linear(2, 2)).training


# ---------------------------------------------------------------- tied parameters


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.seen = []

    def forward(self, tokens):
        self.seen.append((self.embed.weight, self.head.weight))
        return self.head(torch.tanh(self.embed(tokens)))


@pytest.mark.parametrize("local", [False, True])
def test_tied_parameters_stay_tied(local):
    net = TiedLM()
    model = bnn.BayesianModule(net, local_reparameterization=local)
    assert model.reparametrized_names() == ["embed.weight"]
    assert model.variational[0].numel == 40
    tokens = _tokens()
    model(tokens)
    embed_weight, head_weight = net.seen[-1]
    assert embed_weight is head_weight
    sample = model.sample_parameters()
    assert list(sample) == ["embed.weight", "head.weight"]
    assert sample["embed.weight"] is sample["head.weight"]
    with model.frozen_sample():
        weight = model.sample_parameters()["embed.weight"].detach().requires_grad_()
        model(tokens).square().sum().backward()
    # The same loss on a plain tied model: the gradient sums both uses of the weight.
    plain = functional_call(TiedLM(), {"embed.weight": weight, "head.weight": weight}, (tokens,))
    plain.square().sum().backward()
    store = model.variational[0]
    sigma = F.softplus(store.rho.detach())
    eps = (weight.detach().reshape(-1) - store.mu.detach()) / sigma
    torch.testing.assert_close(store.mu.grad, weight.grad.reshape(-1))
    expected_rho = weight.grad.reshape(-1) * eps * torch.sigmoid(store.rho.detach())
    torch.testing.assert_close(store.rho.grad, expected_rho)


# ---------------------------------------------------------------- state


def _mlp(dtype=torch.float32):
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)


STATE_SPECS = [
    ("gaussian", ("gaussian", {"sigma": 0.5})),
    (("pretrained_gaussian", {"delta": 0.1}), "empirical_gaussian"),
    ("pretrained_normal", ("laplace", {"scale": 0.3})),
    ("normal", "scale_mixture"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("posterior", "prior"), STATE_SPECS)
def test_state_dict_round_trip_is_bit_exact(tmp_path, posterior, prior, dtype):
    model = bnn.BayesianModule(_mlp(dtype), posterior, prior)
    with torch.no_grad():
        model.variational[0].mu.add_(torch.randn_like(model.variational[0].mu))
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    fresh = bnn.BayesianModule(_mlp(dtype), posterior, prior)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    expected = model.state_dict()
    loaded = fresh.state_dict()
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == loaded[key].dtype and torch.equal(value, loaded[key]), key
        else:
            assert value == loaded[key], key
    x = torch.randn(4, 3).to(dtype)
    with model.mean_weights(), fresh.mean_weights():
        assert torch.equal(model(x), fresh(x))
    torch.manual_seed(7)
    drawn = model(x)
    torch.manual_seed(7)
    assert torch.equal(drawn, fresh(x))
    if prior != "scale_mixture":
        assert torch.equal(model.kl_divergence(), fresh.kl_divergence())


@pytest.mark.parametrize(
    ("saved", "built"),
    [
        (("gaussian", {"sigma": 0.5}), "gaussian"),
        (("gaussian", {"mu": 0.3, "sigma": 2.0}), ("normal", {"sigma": 0.1})),
        (("laplace", {"scale": 0.2}), "laplace"),
    ],
)
def test_loaded_priors_drive_the_kl(saved, built):
    # Priors are part of the state: the KL after loading is the saved model's KL.
    model = bnn.BayesianModule(_mlp(torch.float64), prior=saved)
    fresh = bnn.BayesianModule(_mlp(torch.float64), prior=built)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.kl_divergence(), model.kl_divergence(), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        sum(fresh.kl_by_parameter().values()), model.kl_divergence().detach()
    )


@pytest.mark.parametrize(
    ("make", "kwargs"),
    [
        (lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)), {}),
        (lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh()), {}),
        (_mlp, {"exclude": "*.bias"}),
        (_mlp, {"include": "0.*"}),
    ],
    ids=["shape", "fewer-layers", "exclude", "include"],
)
def test_loading_another_architecture_raises_format_error(make, kwargs):
    state = bnn.BayesianModule(_mlp()).state_dict()
    other = bnn.BayesianModule(make(), **kwargs)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(FormatError, match="other reparametrized parameters") as info:
        other.load_state_dict(state)
    assert "same architecture" in info.value.hint
    # Refused before anything was copied.
    for key, value in other.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_the_state_dict_holds_tensors_only_and_saves_as_safetensors(tmp_path):
    model = bnn.BayesianModule(_mlp(), "pretrained_gaussian", "empirical_gaussian")
    state = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(state, path)
    fresh = bnn.BayesianModule(_mlp(), "pretrained_gaussian", "empirical_gaussian")
    fresh.load_state_dict(safetensors_torch.load_file(path))
    for key, value in state.items():
        assert torch.equal(value, fresh.state_dict()[key]), key


class _TwoLayers(nn.Module):
    def __init__(self, first: str):
        super().__init__()
        for name in (first, "b" if first == "a" else "a"):
            self.add_module(name, nn.Linear(2, 2))


def test_a_layout_with_equal_sizes_in_another_order_is_refused_before_copying():
    state = bnn.BayesianModule(_TwoLayers("a")).state_dict()
    other = bnn.BayesianModule(_TwoLayers("b"))
    assert other.variational[0].mu.shape == state["variational.0.mu"].shape
    before = other.variational[0].mu.detach().clone()
    with pytest.raises(FormatError, match="shapes or order"):
        other.load_state_dict(state)
    assert torch.equal(other.variational[0].mu, before)


def test_deepcopy_is_independent():
    model = bnn.BayesianModule(_mlp(), local_reparameterization=True)
    clone = copy.deepcopy(model)
    x = torch.randn(4, 3)
    with model.mean_weights(), clone.mean_weights():
        assert torch.equal(model(x), clone(x))
        with torch.no_grad():
            clone.variational[0].mu.zero_()
        before = model(x)
        assert torch.equal(clone(x), clone.module[2](torch.zeros(4, 5)))
        assert not torch.equal(before, clone(x))
    assert clone.module is not model.module
    assert clone.module[0].weight.shape == (5, 3)
    clone(x).sum().backward()
    assert model.variational[0].mu.grad is None
    assert clone.variational[0].mu.grad is not None
    with clone.frozen_sample():
        assert not torch.equal(model(x), model(x))


def test_pickling_the_whole_module(tmp_path):
    model = bnn.BayesianModule(_mlp(), prior="laplace")
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    x = torch.randn(4, 3)
    torch.manual_seed(3)
    drawn = model(x)
    torch.manual_seed(3)
    assert torch.equal(drawn, loaded(x))
    assert torch.equal(model.kl_divergence(), loaded.kl_divergence())
    optimizer = torch.optim.SGD(loaded.parameters(), lr=0.1)
    (loaded(x).sum() + loaded.kl_divergence()).backward()
    optimizer.step()
    with model.mean_weights(), loaded.mean_weights():
        assert not torch.equal(model(x), loaded(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("when", ["before", "after"])
def test_dtypes(dtype, when):
    net = _mlp(dtype) if when == "before" else _mlp()
    model = bnn.BayesianModule(net)
    if when == "after":
        model.to(dtype)
    assert model.variational[0].mu.dtype == dtype and model._kl_meta.dtype == dtype
    x = torch.randn(4, 3).to(dtype)
    y = model(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert all(v.dtype == dtype for v in model.sample_parameters().values())
    kl = model.kl_divergence()
    assert kl.dtype == dtype
    (y.float().sum() + kl.float()).backward()
    assert torch.isfinite(model.variational[0].rho.grad).all()
    model.double()
    assert model._kl_meta.dtype == torch.float64
    assert model.kl_divergence().dtype == torch.float64
    assert model(x.double()).dtype == torch.float64


# ---------------------------------------------------------------- any strides


def _strided_net():
    """A channels_last CNN whose head holds a transposed (non-contiguous) weight."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4))
    net[2].weight = nn.Parameter(torch.randn(12, 4).t())
    return net.to(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "posterior", ["gaussian", "pretrained_gaussian", ("pretrained_gaussian", {"delta": 0.1})]
)
@pytest.mark.parametrize("prior", ["gaussian", "empirical_gaussian", "laplace"])
def test_non_contiguous_weights_convert_like_contiguous_ones(posterior, prior):
    net = _strided_net()
    assert not net[0].weight.is_contiguous() and not net[2].weight.is_contiguous()
    plain = copy.deepcopy(net)
    for layer in (plain[0], plain[2]):
        layer.weight = nn.Parameter(layer.weight.detach().contiguous())
    torch.manual_seed(1)
    model = bnn.BayesianModule(net, posterior, prior)
    torch.manual_seed(1)
    expected = bnn.BayesianModule(plain, posterior, prior)
    for key, tensor in model.variational_state().items():
        assert torch.equal(tensor, expected.variational_state()[key]), key
    assert all(t.is_contiguous() for t in model.state_dict().values() if torch.is_tensor(t))
    x = torch.randn(2, 2, 4, 4).to(memory_format=torch.channels_last)
    with model.mean_weights(), expected.mean_weights():
        torch.testing.assert_close(model(x), expected(x))
    assert model.kl_by_parameter() == expected.kl_by_parameter()


# ---------------------------------------------------------------- include / exclude


def test_excluded_parameters_stay_trainable_parameters():
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    norm_weight, norm_bias = net[1].weight, net[1].bias
    model = bnn.BayesianModule(net, exclude=["1.*", "2.bias"])
    assert model.reparametrized_names() == ["0.weight", "0.bias", "2.weight"]
    assert net[1].weight is norm_weight and isinstance(norm_weight, nn.Parameter)
    assert not bnn.is_reparametrized(net[1]) and not bnn.is_reparametrized(net[2], "bias")
    params = dict(model.named_parameters())
    assert params["module.1.weight"] is norm_weight and params["module.1.bias"] is norm_bias
    assert params["module.2.bias"] is net[2].bias
    before = norm_weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).square().sum().backward()
    assert norm_weight.grad is not None
    optimizer.step()
    assert not torch.equal(norm_weight, before)
    assert model.num_variational_elements == 12 + 4 + 8


def test_include_selects_parameters():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model = bnn.BayesianModule(net, include="*.weight")
    assert model.reparametrized_names() == ["0.weight", "1.weight"]
    assert isinstance(net[0].bias, nn.Parameter)


@pytest.mark.parametrize(
    "kwargs",
    [{"include": "encoder.*"}, {"exclude": "*"}, {"include": ["0.weight"], "exclude": "0.*"}],
)
def test_patterns_matching_nothing_raise_usage_error(kwargs):
    net = _mlp()
    with pytest.raises(UsageError, match="no parameter matches") as info:
        bnn.BayesianModule(net, **kwargs)
    assert "0.weight" in info.value.hint and "2.bias" in info.value.hint
    assert not bnn.is_reparametrized(net[0])


# ---------------------------------------------------------------- pretrained


def test_pretrained_posterior_starts_at_the_trained_network():
    net = _mlp()
    reference = copy.deepcopy(net)
    model = bnn.BayesianModule(net, "pretrained_gaussian")
    x = torch.randn(6, 3)
    with model.mean_weights():
        assert torch.equal(model(x), reference(x))
    default = bnn.BayesianModule(copy.deepcopy(reference))
    with default.mean_weights():
        assert not torch.allclose(default(x), reference(x))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"delta": 0.2, "min_sigma": 0.01}, lambda w: (0.2 * w.abs()).clamp_min(0.01)),
        ({"sigma": 0.03}, lambda w: torch.full_like(w, 0.03)),
        ({}, lambda w: torch.full_like(w, math.log1p(math.exp(-3.0)))),
    ],
)
def test_pretrained_posterior_spread(kwargs, expected):
    net = _mlp()
    with torch.no_grad():
        net[0].weight[0, 0] = 0.0
    weights = {name: p.detach().clone() for name, p in net.named_parameters()}
    model = bnn.BayesianModule(net, ("pretrained_gaussian", kwargs), "empirical_gaussian")
    for name, weight in weights.items():
        q = model.posterior_distribution(name)
        assert torch.equal(q.loc, weight)
        torch.testing.assert_close(q.scale, expected(weight))
    for prior, weight in zip(model.priors, weights.values(), strict=True):
        assert torch.equal(prior.mu, weight)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("value", [torch.randn(3), "net", None, nn.Linear])
def test_non_module_is_a_type_error(value):
    with pytest.raises(TypeError, match=r"needs an nn\.Module") as info:
        bnn.BayesianModule(value)
    assert isinstance(info.value, ArgumentTypeError)


def test_module_without_parameters_and_double_wrapping():
    with pytest.raises(UsageError, match="no parameters"):
        bnn.BayesianModule(nn.Sequential(nn.ReLU(), nn.Tanh()))
    model = bnn.BayesianModule(_mlp())
    with pytest.raises(UsageError, match="already a BayesianModule"):
        bnn.BayesianModule(model)


@pytest.mark.parametrize(
    ("posterior", "prior", "match"),
    [
        ("pretrained_gausian", None, "Did you mean 'pretrained_gaussian'"),
        ("student", None, "unknown posterior 'student'"),
        (None, "lapalce", "Did you mean 'laplace'"),
    ],
)
def test_unknown_names_are_key_errors(posterior, prior, match):
    net = _mlp()
    with pytest.raises(KeyError, match=match) as info:
        bnn.BayesianModule(net, posterior, prior)
    factory = bnn.PosteriorFactory if prior is None else bnn.PriorFactory
    for name in factory.names:
        assert name in str(info.value)


def test_names_are_case_insensitive():
    model = bnn.BayesianModule(_mlp(), "Pretrained_Gaussian", ("LAPLACE", {"scale": 0.5}))
    assert type(model.priors[0]) is bnn.LaplacePrior
    assert model.posterior_spec == ("pretrained_gaussian", {})


BAD_SPECS = [
    (("gaussian", {"sigma": 0.0}), None, "sigma must be a finite number > 0"),
    (("gaussian", {"sigmaa": 1.0}), None, "invalid arguments"),
    (None, ("gaussian", {"sigma": -1.0}), "sigma must be > 0"),
    (None, ("gaussian", {"foo": 1.0}), "invalid arguments"),
    (None, ("scale_mixture", {"pi": 1.2}), r"pi must be a number in \(0, 1\)"),
    # Valid for the weight, invalid for the bias: fails on the second parameter.
    (None, ("gaussian", {"mu": torch.zeros(5, 3)}), "does not broadcast"),
]


@pytest.mark.parametrize(("posterior", "prior", "match"), BAD_SPECS)
def test_bad_arguments_name_the_parameter_and_leave_the_module_untouched(posterior, prior, match):
    net = _mlp()
    params = dict(net.named_parameters())
    with pytest.raises(ValueError, match=match) as info:
        bnn.BayesianModule(net, posterior, prior)
    assert str(info.value).startswith("parameter '0.")
    assert dict(net.named_parameters()) == params
    assert not any(bnn.is_reparametrized(layer) for layer in net)
    assert bnn.BayesianModule(net).reparametrized_names() == list(params)


def test_unknown_parameter_name_in_introspection():
    model = bnn.BayesianModule(_mlp())
    with pytest.raises(ValueError, match="'nope' is not a reparametrized parameter"):
        model.posterior_distribution("nope")


# ---------------------------------------------------------------- variational state


def test_variational_state_round_trip():
    model = bnn.BayesianModule(_mlp(), "pretrained_gaussian")
    state = {k: v.clone() for k, v in model.variational_state().items()}
    assert {"0.weight.mu", "0.weight.rho", "2.bias.mu", "2.bias.rho"} <= set(state)
    assert state["0.weight.mu"].shape == (5, 3)
    fresh = bnn.BayesianModule(_mlp())
    assert fresh.load_variational_state(state) == ([], [])
    x = torch.randn(3, 3)
    with model.mean_weights(), fresh.mean_weights():
        assert torch.equal(model(x), fresh(x))
    partial = {k: v for k, v in state.items() if not k.startswith("2.")}
    with pytest.raises(FormatError, match="missing"):
        fresh.load_variational_state(partial)
    missing, unexpected = fresh.load_variational_state(
        {**partial, "x.mu": state["0.bias.mu"]}, strict=False
    )
    assert "2.bias.mu" in missing and unexpected == ["x.mu"]
    with pytest.raises(FormatError, match="has shape"):
        fresh.load_variational_state({**state, "0.bias.mu": torch.zeros(4)})


# ------------------------------------------------ public view for the upper layers


def test_device_dtype_and_variational_parameters(device, dtype):
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model = bnn.BayesianModule(net, exclude=["1.*"]).to(device, dtype)
    assert (model.device.type, model.dtype) == (device.type, dtype)
    assert model.kl_divergence().dtype == dtype
    trained = list(model.variational_parameters())
    assert {id(p) for p in trained} == {id(p) for s in model.variational for p in s.parameters()}
    kept = {id(p) for p in net[1].parameters()}
    assert kept and not kept & {id(p) for p in trained}
    assert {id(p) for p in model.parameters()} == {id(p) for p in trained} | kept


def test_reparametrized_parameters_with_their_posterior_and_prior(device, dtype):
    net = nn.Linear(3, 2).to(device, dtype)
    weight = net.weight.detach().clone()
    model = bnn.BayesianModule(net, "pretrained_gaussian", ("laplace", {"scale": 0.5}))
    params = list(model.reparametrized_parameters())
    assert [p.name for p in params] == model.reparametrized_names() == ["weight", "bias"]
    first = params[0]
    assert first.aliases == ("weight",) and first.shape == (2, 3)
    assert torch.equal(first.posterior.mean, weight)
    assert first.posterior.mean.device.type == device.type
    assert isinstance(first.prior, bnn.LaplacePrior) and float(first.prior.scale) == 0.5
    # The posterior reads the storage: a change of mu shows through.
    with torch.no_grad():
        model.variational[0].mu.zero_()
    assert not first.posterior.mean.any()


def test_variational_state_keys_are_the_key_scheme():
    from bnnify.bnn.keys import posterior_key, prior_key

    model = bnn.BayesianModule(nn.Linear(2, 2), prior="empirical_gaussian")
    expected = {posterior_key(n, r) for n in ("weight", "bias") for r in ("mu", "rho")}
    expected |= {prior_key(n, "mu") for n in ("weight", "bias")}
    assert set(model.variational_state()) == expected


# ---------------------------------------------------------------- logging


@pytest.mark.parametrize("flag", ["verbose", "debug"])
def test_verbose_logs_one_line_per_parameter(caplog, flag):
    logger = logging.getLogger("bnnify")
    level = logger.level
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
    # The handler takes INFO; the "bnnify" logger stays at its default level.
    with caplog.at_level(logging.INFO, logger="unrelated"):
        bnn.BayesianModule(net, **{flag: True})
    records = [r for r in caplog.records if r.name == "bnnify"]
    assert len(records) == 3
    assert all(r.levelno == logging.INFO for r in records)
    for record, name in zip(records, ["0.weight", "0.bias", "1.weight"], strict=True):
        assert name in record.getMessage()
    assert "shape=(4, 3)" in records[0].getMessage()
    assert logger.level == level


def test_quiet_by_default(caplog):
    with caplog.at_level(logging.INFO, logger="unrelated"):
        bnn.BayesianModule(_mlp(), verbose=False)
    assert caplog.records == []


# ---------------------------------------------------------------- worked example


def test_reference_example_regression_uncertainty():
    # The reference's worked example: a BNN fitting sin(1.5 x) on [-5, 5] is confident
    # inside the data and uncertain outside it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.rand(300, 1) * 10 - 5
        y = torch.sin(1.5 * x) + 0.1 * torch.randn_like(x)
        layers = [nn.Linear(1, 20), nn.ReLU()]
        for _ in range(3):
            layers += [nn.Linear(20, 20), nn.ReLU()]
        model = bnn.BayesianModule(nn.Sequential(*layers, nn.Linear(20, 1)))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(1200):
            optimizer.zero_grad()
            loss = F.mse_loss(model(x), y) + 0.1 * model.kl_divergence(reduction="mean")
            loss.backward()
            optimizer.step()
        grid = torch.linspace(-8.5, 8.5, 341).unsqueeze(1)
        with torch.no_grad():
            draws = torch.stack([model(grid) for _ in range(100)]).squeeze(-1)
    finally:
        torch.set_num_threads(threads)
    grid = grid.squeeze(1)
    inside = grid.abs() <= 4
    outside = grid.abs() >= 6.5
    rmse = (draws.mean(0) - torch.sin(1.5 * grid))[grid.abs() <= 5].square().mean().sqrt()
    assert rmse < 0.3
    std = draws.std(0)
    assert std[outside].mean() >= 2 * std[inside].mean()


# ---------------------------------------------------------------- torch.compile


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")
def test_torch_compile_forward_and_kl():
    model = bnn.BayesianModule(_mlp())
    x = torch.randn(4, 3)
    forward = torch.compile(model)
    y = forward(x)
    assert y.shape == (4, 2) and torch.isfinite(y).all()
    assert not torch.equal(y, forward(x))
    kl = torch.compile(model.kl_divergence)
    compiled = kl()
    eager = model.kl_divergence()
    torch.testing.assert_close(compiled, eager)
    compiled.backward()
    grad = model.variational[0].mu.grad.clone()
    model.zero_grad()
    eager.backward()
    torch.testing.assert_close(grad, model.variational[0].mu.grad)


# ---------------------------------------------------------------- docstring examples


@pytest.mark.parametrize("name", ["registry", "priors", "posteriors", "module"])
def test_docstring_examples_run(name):
    module = importlib.import_module(f"bnnify.bnn.{name}")
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    result = doctest.testmod(module, optionflags=flags, verbose=False, report=False)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------- given weights


def test_given_weights_replace_the_samples_and_take_the_gradient(device, dtype):
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(device, dtype)
    model = bnn.BayesianModule(net, local_reparameterization=True)
    x = torch.randn(5, 3, device=device, dtype=dtype)
    first = {
        "0.weight": torch.randn(4, 3, device=device, dtype=dtype, requires_grad=True),
        "0.bias": torch.randn(4, device=device, dtype=dtype, requires_grad=True),
    }
    zeros = {
        "2.weight": torch.zeros(2, 4, device=device, dtype=dtype),
        "2.bias": torch.ones(2, device=device, dtype=dtype),
    }
    with model.given_weights(first):
        one, two = model(x), model(x)
        assert model.predictive_estimator(x).estimator is bnn.Estimator.FROZEN_SAMPLE
        assert model.sample_parameters()["0.weight"] is first["0.weight"]
        with model.given_weights(zeros):  # nested: the inner values, then the outer ones
            assert torch.equal(model(x), torch.ones(5, 2, device=device, dtype=dtype))
        assert model.sample_parameters()["2.bias"] is not zeros["2.bias"]
    assert not torch.equal(one, two)  # the second layer is still sampled
    every = {**first, **{k: torch.randn_like(v).requires_grad_() for k, v in zeros.items()}}
    with model.given_weights(every):
        model(x).sum().backward()
    assert first["0.weight"].grad.abs().sum() > 0 and every["2.weight"].grad.abs().sum() > 0
    assert model.variational[0].mu.grad is None  # the posterior took no gradient
    with pytest.raises(ValueError, match=r"'0\.weight' has shape"):
        model.given_weights({"0.weight": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="'nope' is not reparametrized"):
        model.given_weights({"nope": torch.zeros(1)})


def test_predict_samples_passes_several_inputs_and_keywords_to_every_pass():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, mask, scale: float = 1.0):
            return self.lin(x) * mask * scale

    model = bnn.BayesianModule(Scaled())
    x, mask = torch.randn(4, 3), torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    samples = model.predict_samples(x, mask, num_samples=6, scale=0.0)
    assert samples.shape == (6, 4, 2) and torch.equal(samples, torch.zeros(6, 4, 2))
    samples = model.predict_samples(x, mask=mask, num_samples=6)
    assert samples[:, 1].abs().sum() == 0 and samples[:, 0].std(0).min() > 0
    choice = model.predictive_estimator(x, mask=mask)
    assert choice.estimator is bnn.Estimator.WEIGHT_SAMPLING
    assert choice.reason == "the model is given keyword arguments (mask), not one tensor"
    with model.local_reparameterization():
        # The user's assertion: every pass samples the Linear pre-activations per row.
        local = model.predict_samples(x, mask, num_samples=6)
        assert (
            model.predictive_estimator(x, mask).estimator is bnn.Estimator.LOCAL_REPARAMETERIZATION
        )
    assert local.shape == (6, 4, 2) and local[:, 1].abs().sum() == 0
