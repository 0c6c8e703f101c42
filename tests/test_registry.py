"""Tests of the case-insensitive registries, spec parsing and user extensions."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.distributions import Distribution, Normal, StudentT, kl_divergence

import bnnify.bnn as bnn
from bnnify.bnn.registry import Factory, parse_spec
from bnnify.errors import InvalidArgumentError, UnknownNameError


class LogScalePosterior(bnn.VariationalPosterior):
    """A Gaussian posterior parametrized by log-sigma: not packable into a flat store."""

    def __init__(self, loc: torch.Tensor, log_scale: torch.Tensor):
        super().__init__()
        self.loc = nn.Parameter(loc)
        self.log_scale = nn.Parameter(log_scale)

    @classmethod
    def from_param(cls, param, *, scale: float = 0.1):
        return cls(param.detach().clone(), torch.full_like(param, math.log(scale)))

    @property
    def distribution(self) -> Distribution:
        return Normal(self.loc, self.log_scale.exp())


class StudentTPrior(bnn.Prior):
    """A prior torch has no closed-form KL for, with neither fused method."""

    def __init__(self, shape=(), dtype=None, device=None, *, df: float = 3.0):
        super().__init__(shape, dtype, device)
        self.register_buffer("df", self._tensor(df, "df", positive=True))

    @property
    def distribution(self) -> Distribution:
        return StudentT(self.df, torch.zeros_like(self.df), torch.ones_like(self.df)).expand(
            self.shape
        )


class PlainNormalPrior(bnn.Prior):
    """A N(0, 1) prior without `gaussian_kl`: the closed form comes from torch."""

    def __init__(self, shape=(), dtype=None, device=None):
        super().__init__(shape, dtype, device)
        self.register_buffer("scale", self._tensor(1.0, "scale"))

    @property
    def distribution(self) -> Distribution:
        return Normal(torch.zeros_like(self.scale), self.scale).expand(self.shape)


FACTORIES = [bnn.PosteriorFactory, bnn.PriorFactory]


# ---------------------------------------------------------------- lookup


@pytest.mark.parametrize("name", ["gaussian", "GAUSSIAN", "Gaussian", " normal ", "NoRmAl"])
@pytest.mark.parametrize("factory", FACTORIES)
def test_lookup_is_case_insensitive(factory, name):
    expected = bnn.GaussianPosterior if factory is bnn.PosteriorFactory else bnn.GaussianPrior
    assert factory[name] is expected
    assert name in factory


def test_reference_names_and_aliases():
    assert {"gaussian", "normal", "pretrained_gaussian", "pretrained_normal"} <= set(
        bnn.PosteriorFactory.factories
    )
    assert {"gaussian", "normal", "empirical_gaussian", "laplace", "scale_mixture"} <= set(
        bnn.PriorFactory.factories
    )
    assert bnn.PosteriorFactory["pretrained_normal"] is bnn.PretrainedGaussianPosterior
    assert bnn.NormalPosterior is bnn.GaussianPosterior
    assert bnn.PretrainedNormalPosterior is bnn.PretrainedGaussianPosterior
    assert bnn.NormalPrior is bnn.GaussianPrior
    assert list(bnn.PriorFactory.names) == sorted(bnn.PriorFactory.factories)


@pytest.mark.parametrize("factory", FACTORIES)
def test_factories_mapping_is_read_only(factory):
    with pytest.raises(TypeError):
        factory.factories["sneaky"] = lambda: bnn.GaussianPrior
    assert "sneaky" not in factory


@pytest.mark.parametrize("factory", FACTORIES)
def test_unknown_name_lists_registered_names_and_suggests(factory):
    with pytest.raises(KeyError) as info:
        factory["gausian"]
    error = info.value
    assert isinstance(error, UnknownNameError)
    text = str(error)
    assert "'gausian'" in text
    assert "Did you mean 'gaussian'?" in text
    for name in factory.names:
        assert name in text
    # KeyError would quote the message: ours reads as plain text.
    assert not text.startswith(("'", '"'))


@pytest.mark.parametrize("factory", FACTORIES)
def test_unknown_far_name_has_no_suggestion(factory):
    with pytest.raises(UnknownNameError) as info:
        factory["zzzzzzzz"]
    assert "Did you mean" not in str(info.value)
    assert "gaussian" in str(info.value)


@pytest.mark.parametrize("name", [None, 3, ("gaussian",)])
def test_non_string_lookup_raises_key_error(name):
    with pytest.raises(KeyError, match="must be a string"):
        bnn.PriorFactory[name]
    assert name not in bnn.PriorFactory


# ---------------------------------------------------------------- registration


@pytest.mark.parametrize("name", ["gaussian", "GAUSSIAN", " Normal "])
@pytest.mark.parametrize("factory", FACTORIES)
def test_registering_a_name_twice_raises_value_error(factory, name):
    before = factory["gaussian"]
    with pytest.raises(ValueError, match="already registered"):
        factory.register(name)(StudentTPrior)
    with pytest.raises(ValueError, match="already registered"):
        factory.register_factory_function(name)(lambda: StudentTPrior)
    assert factory["gaussian"] is before


@pytest.mark.parametrize("name", ["", "   ", None, 1])
def test_registering_an_invalid_name_raises(name):
    with pytest.raises(InvalidArgumentError, match="non-empty string"):
        bnn.PriorFactory.register(name)(StudentTPrior)


def test_register_factory_function_resolves_lazily_and_once():
    calls = []

    @bnn.PriorFactory.register_factory_function("my_prior")
    def make():
        calls.append(1)
        return StudentTPrior

    assert callable(make) and make.__name__ == "make"
    assert calls == []
    assert "MY_PRIOR" in bnn.PriorFactory
    assert bnn.PriorFactory["My_Prior"] is StudentTPrior
    assert bnn.PriorFactory["my_prior"] is StudentTPrior
    assert calls == [1]
    assert bnn.PriorFactory.factories["my_prior"] is make


def test_register_decorator_returns_the_class():
    assert bnn.PriorFactory.register("student_t")(StudentTPrior) is StudentTPrior
    assert bnn.PriorFactory["Student_T"] is StudentTPrior


def test_registrations_are_undone_between_tests():
    # The previous tests registered these; the autouse fixture removed them.
    assert "my_prior" not in bnn.PriorFactory
    assert "student_t" not in bnn.PriorFactory


@pytest.mark.parametrize("returned", [bnn.GaussianPosterior, 42, torch.Tensor])
def test_factory_returning_a_foreign_class_is_refused(returned):
    bnn.PriorFactory.register_factory_function("broken")(lambda: returned)
    with pytest.raises(InvalidArgumentError, match="not a subclass of Prior"):
        bnn.PriorFactory["broken"]


def test_fresh_factory_is_empty_and_typed():
    factory = Factory("thing", nn.Module)
    assert factory.names == ()
    factory.register("Linear")(nn.Linear)
    assert factory["LINEAR"] is nn.Linear
    with pytest.raises(UnknownNameError, match="unknown thing 'conv'"):
        factory["conv"]


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, ("gaussian", {})),
        ("Laplace", ("laplace", {})),
        (" NORMAL ", ("normal", {})),
        (("Gaussian", {"sigma": 0.5}), ("gaussian", {"sigma": 0.5})),
        (["gaussian", {}], ("gaussian", {})),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec, "gaussian", "prior") == expected


def test_parse_spec_copies_the_kwargs():
    kwargs = {"sigma": 0.5}
    _, parsed = parse_spec(("gaussian", kwargs), "gaussian", "prior")
    parsed["sigma"] = 2.0
    assert kwargs == {"sigma": 0.5}


@pytest.mark.parametrize(
    "spec", [3, ("gaussian",), ("gaussian", {}, {}), (1, {}), ("gaussian", [("sigma", 1)])]
)
def test_parse_spec_rejects_other_shapes(spec):
    with pytest.raises(ValueError, match="invalid prior spec"):
        parse_spec(spec, "gaussian", "prior")


def test_parse_spec_rejects_non_string_keywords():
    with pytest.raises(InvalidArgumentError, match="keyword names must be strings"):
        parse_spec(("gaussian", {1: 2.0}), "gaussian", "posterior")


# ---------------------------------------------------------------- user extensions


def _linear():
    return nn.Linear(3, 2)


def test_custom_prior_from_factory_function_in_bayesian_module():
    bnn.PriorFactory.register_factory_function("my_prior")(lambda: PlainNormalPrior)
    net = _linear()
    model = bnn.BayesianModule(net, prior="MY_PRIOR")
    assert all(type(p) is PlainNormalPrior for p in model.priors)
    # No fused kernel, but torch knows KL(Normal || Normal): analytic, no warning needed.
    expected = sum(
        kl_divergence(model.posterior_distribution(name), Normal(0.0, 1.0)).sum()
        for name in ("weight", "bias")
    )
    kl = model.kl_divergence()
    torch.testing.assert_close(kl, expected.to(kl.dtype))
    kl.backward()
    assert model.variational[0].mu.grad.abs().sum() > 0


class ReferenceStylePrior(bnn.Prior):
    """Written for the reference, where `Prior` is a plain abstract class: no
    `super().__init__()`, and its tensors are plain attributes in its own dtype."""

    def __init__(self, shape=(), dtype=None, device=None, *, sigma: float = 0.5):
        self.shape = torch.Size(shape)
        self.sigma = torch.tensor(sigma)  # the default dtype, whatever the parameter's

    @property
    def distribution(self) -> Distribution:
        return Normal(torch.zeros_like(self.sigma), self.sigma).expand(self.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_prior_that_skips_super_init_works_through_the_factory(tmp_path, dtype):
    bnn.PriorFactory.register_factory_function("reference_style")(lambda: ReferenceStylePrior)
    model = bnn.BayesianModule(_linear().to(dtype), prior=("reference_style", {"sigma": 0.5}))
    assert all(type(p) is ReferenceStylePrior for p in model.priors)
    posteriors = [model.posterior_distribution(n) for n in ("weight", "bias")]
    expected = sum(
        kl_divergence(Normal(q.loc.double(), q.scale.double()), Normal(0.0, 0.5)).sum()
        for q in posteriors
    )
    # The reference's rule: the KL has the dtype (and device) of the `_kl_meta` buffer,
    # whatever dtype the prior's own tensors have.
    kl = model.kl_divergence()
    assert kl.dtype == dtype == model._kl_meta.dtype
    torch.testing.assert_close(kl.double(), expected.detach(), rtol=1e-6, atol=0)
    kl.backward()
    assert model.variational[0].mu.grad.abs().sum() > 0
    by_name = model.kl_by_parameter()
    torch.testing.assert_close(sum(by_name.values()), expected.detach(), rtol=1e-6, atol=0)
    other = torch.float64 if dtype == torch.float32 else torch.float32
    model.to(other)
    assert model.kl_divergence().dtype == other
    assert (
        bnn.BayesianModule(_linear(), prior="reference_style", dtype=other).kl_divergence().dtype
        == other
    )
    assert "priors.0.sigma" not in model.state_dict()  # a plain attribute, as in the reference
    clone = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for copied in (clone, loaded):
        assert copied.kl_divergence().item() == model.kl_divergence().item()


def test_custom_prior_without_closed_form_uses_monte_carlo():
    bnn.PriorFactory.register_factory_function("my_prior")(lambda: StudentTPrior)
    model = bnn.BayesianModule(_linear(), prior=("my_prior", {"df": 4.0}))
    with pytest.raises(ValueError, match="approx_num_samples") as info:
        model.kl_divergence()
    assert "StudentTPrior" in str(info.value)
    estimates = torch.stack(
        [model.kl_divergence(approx_num_samples=64).detach() for _ in range(30)]
    ).double()
    # Brute force: whole-model samples of log q(w) - log p(w) through torch.distributions.
    prior = StudentT(torch.tensor(4.0, dtype=torch.float64))
    per_sample = 0
    for name in ("weight", "bias"):
        q = model.posterior_distribution(name)
        q = Normal(q.loc.detach().double(), q.scale.detach().double())
        w = q.sample((4000,))
        per_sample = per_sample + (q.log_prob(w) - prior.log_prob(w)).flatten(1).sum(1)
    error = math.hypot(
        estimates.std() / math.sqrt(len(estimates)), per_sample.std() / math.sqrt(4000)
    )
    assert abs(estimates.mean() - per_sample.mean()) < 4 * error


@pytest.mark.parametrize("scale", [0.05, 0.3])
def test_custom_posterior_uses_the_generic_path(scale):
    bnn.PosteriorFactory.register("log_scale")(LogScalePosterior)
    net = _linear()
    weight = net.weight.detach().clone()
    model = bnn.BayesianModule(net, ("Log_Scale", {"scale": scale}))
    assert len(model.variational) == 0
    assert sorted(model.posteriors) == ["bias", "weight"]
    names = {name for name, _ in model.named_parameters()}
    assert names == {
        f"posteriors.{p}.{v}" for p in ("weight", "bias") for v in ("loc", "log_scale")
    }
    x = torch.randn(4, 3)
    assert not torch.equal(model(x), model(x))
    with model.mean_weights():
        torch.testing.assert_close(net.weight, weight)
        assert torch.equal(model(x), model(x))
    with model.frozen_sample():
        first = model(x)
        assert torch.equal(first, model(x))
    assert not torch.equal(first, model(x))
    sample = model.sample_parameters()
    assert sample["weight"].shape == (2, 3)


def test_custom_posterior_kl_closed_form_and_monte_carlo():
    bnn.PosteriorFactory.register("log_scale")(LogScalePosterior)
    model = bnn.BayesianModule(_linear(), "log_scale", ("gaussian", {"sigma": 0.5}))
    expected = sum(
        kl_divergence(q.distribution, Normal(0.0, 0.5)).sum() for q in model.posteriors.values()
    )
    kl = model.kl_divergence()
    torch.testing.assert_close(kl, expected)
    kl.backward()
    for posterior in model.posteriors.values():
        assert posterior.loc.grad.abs().sum() > 0
        assert posterior.log_scale.grad.abs().sum() > 0
    with pytest.warns(UserWarning, match="closed-form"):
        model.kl_divergence(approx_num_samples=4)


def test_custom_posterior_with_scale_mixture_prior_needs_monte_carlo():
    bnn.PosteriorFactory.register("log_scale")(LogScalePosterior)
    model = bnn.BayesianModule(_linear(), "log_scale", "scale_mixture")
    with pytest.raises(ValueError, match="approx_num_samples"):
        model.kl_divergence()
    kl = model.kl_divergence(approx_num_samples=16)
    assert torch.isfinite(kl) and kl.requires_grad
    kl.backward()
    assert all(q.log_scale.grad is not None for q in model.posteriors.values())


def test_custom_posterior_state_dict_round_trip():
    bnn.PosteriorFactory.register("log_scale")(LogScalePosterior)
    model = bnn.BayesianModule(_linear(), "log_scale")
    fresh = bnn.BayesianModule(_linear(), "log_scale")
    fresh.load_state_dict(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(2, 3)
    with model.mean_weights(), fresh.mean_weights():
        assert torch.equal(model(x), fresh(x))


def test_gaussian_subclass_changing_only_init_is_stored_flat():
    @bnn.PosteriorFactory.register("zero_gaussian")
    class ZeroGaussian(bnn.GaussianPosterior):
        @classmethod
        def from_param(cls, param, *, sigma: float = 0.2):
            rho = bnn.posteriors.inverse_softplus(torch.full_like(param, sigma))
            return cls(torch.zeros_like(param), rho)

    model = bnn.BayesianModule(_linear(), "zero_gaussian")
    assert len(model.variational) == 1 and len(model.posteriors) == 0
    assert torch.equal(model.variational[0].mu, torch.zeros(8))
    torch.testing.assert_close(model.variational[0].sigma(), torch.full((8,), 0.2))
