"""Variational posteriors q(w) over one parameter tensor, and `PosteriorFactory`."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, Normal

from bnnify.bnn.registry import Factory, Spec, parse_spec
from bnnify.errors import InvalidArgumentError

__all__ = [
    "GaussianPosterior",
    "NormalPosterior",
    "PosteriorFactory",
    "PretrainedGaussianPosterior",
    "PretrainedNormalPosterior",
    "VariationalPosterior",
    "accepted_kwargs",
    "get_posterior",
    "init_function",
    "initialize_into",
    "inverse_softplus",
    "is_flat",
    "restore_posterior",
]

# Elements per chunk of in-place checks: bounds temporaries, not results.
_CHUNK = 1 << 20
# Below torch's parallel grain (32768): elementwise kernels run serially, so values
# computed per chunk do not depend on the thread count.
_SERIAL_CHUNK = 1 << 14


class VariationalPosterior(nn.Module):
    """Base class of variational posteriors over the elements of one parameter.

    A subclass holds its variational parameters as `nn.Parameter`s, is built by
    the classmethod `from_param(param, **kwargs)`, and exposes `distribution`
    (with the parameter's shape; used for the KL divergence) and
    `sample_parameters()` (a reparameterized sample, differentiable with respect
    to the variational parameters). Calling the module returns a sample.
    """

    @classmethod
    def from_param(cls, param: Tensor, **kwargs: Any) -> VariationalPosterior:
        """Builds the posterior that replaces `param`."""
        raise NotImplementedError(f"{cls.__name__} must define the classmethod `from_param`")

    @property
    def distribution(self) -> Distribution:
        """The posterior as a `torch.distributions.Distribution`."""
        raise NotImplementedError(f"{type(self).__name__} must define `distribution`")

    def sample_parameters(self) -> Tensor:
        """A reparameterized sample with the parameter's shape and dtype."""
        return self.distribution.rsample()

    @property
    def mean(self) -> Tensor:
        """The posterior mean, used for deterministic forward passes."""
        return self.distribution.mean

    def forward(self) -> Tensor:
        return self.sample_parameters()


def inverse_softplus(sigma: Tensor) -> Tensor:
    """The `rho` with `softplus(rho) = sigma`, stable for small and large `sigma`."""
    sigma32 = sigma.to(torch.promote_types(sigma.dtype, torch.float32))
    return (sigma32 + torch.log(-torch.expm1(-sigma32))).to(sigma.dtype)


PosteriorFactory: Factory[VariationalPosterior] = Factory("posterior", VariationalPosterior)


@PosteriorFactory.register("gaussian")
@PosteriorFactory.register("normal")
class GaussianPosterior(VariationalPosterior):
    """N(mu, softplus(rho)^2); mu ~ N(0, mu_std^2) at start (discards the weights).

    A diagonal Gaussian posterior N(mu, sigma^2) with sigma = softplus(rho).
    `from_param` discards the parameter's values: `mu ~ N(0, mu_std^2)` and a
    constant `rho` (or the `rho` giving the initial `sigma`).

    Args:
        mu: Initial mean.
        rho: Initial pre-softplus scale.

    Example:
        >>> q = GaussianPosterior.from_param(torch.zeros(2, 3), sigma=0.1)
        >>> q.sample_parameters().shape, round(q.sigma.mean().item(), 6)
        (torch.Size([2, 3]), 0.1)
    """

    def __init__(self, mu: Tensor, rho: Tensor, *, copy: bool = True):
        super().__init__()
        # copy=False adopts tensors made for this posterior (saves two copies).
        self.mu = nn.Parameter(_contiguous(mu.detach(), copy))
        self.rho = nn.Parameter(_contiguous(rho.detach(), copy))

    @classmethod
    def from_param(cls, param: Tensor, **kwargs: Any) -> GaussianPosterior:
        mu, rho = _empty(param), _empty(param)
        cls.initialize_(mu, rho, param.detach(), **kwargs)
        return cls(mu, rho, copy=False)

    @classmethod
    def initialize_(
        cls,
        mu: Tensor,
        rho_out: Tensor,
        param: Tensor,
        *,
        mu_std: float = 0.1,
        rho: float = -3.0,
        sigma: float | None = None,
    ) -> None:
        """Writes the initial `mu` and `rho` for `param` in place (`from_param`'s work).

        A `BayesianModule` calls it on views of its flat storage, so that no
        temporary of the parameter's size is built.
        """
        _check_number(cls, "mu_std", mu_std, minimum=0.0)
        if not mu.is_meta:
            mu.normal_(0.0, float(mu_std))
        rho_out.fill_(_initial_rho(cls, rho=rho, sigma=sigma))

    @property
    def sigma(self) -> Tensor:
        return F.softplus(self.rho)

    @property
    def distribution(self) -> Distribution:
        return Normal(self.mu, self.sigma)

    def sample_parameters(self) -> Tensor:
        return torch.addcmul(self.mu, self.sigma, torch.randn_like(self.mu))

    @property
    def mean(self) -> Tensor:
        return self.mu


NormalPosterior = GaussianPosterior


@PosteriorFactory.register("pretrained_gaussian")
@PosteriorFactory.register("pretrained_normal")
class PretrainedGaussianPosterior(GaussianPosterior):
    """N(w, sigma^2) starting at the trained weights; one of sigma = delta*|w| (MOPED), a
    constant sigma, or softplus(rho) (default rho=-3); floored at min_sigma.

    A Gaussian posterior that starts at a trained model: `mu = w`. The initial spread
    is one of: `delta` (sigma = delta * |w|, the MOPED recipe of Krishnan et al.,
    2020), `sigma` (a constant), or `rho` (sigma = softplus(rho); the default, -3,
    gives sigma ~ 0.049). `min_sigma` floors the spread, so that
    weights at zero keep some uncertainty.

    Example:
        >>> w = torch.tensor([1.0, -2.0, 0.0])
        >>> q = PretrainedGaussianPosterior.from_param(w, delta=0.1, min_sigma=1e-3)
        >>> torch.equal(q.mu, w), [round(s, 4) for s in q.sigma.tolist()]
        (True, [0.1, 0.2, 0.001])
    """

    @classmethod
    def initialize_(
        cls,
        mu: Tensor,
        rho_out: Tensor,
        param: Tensor,
        *,
        rho: float | None = None,
        sigma: float | None = None,
        delta: float | None = None,
        min_sigma: float = 1e-6,
    ) -> None:
        given = {
            k: v for k, v in (("rho", rho), ("sigma", sigma), ("delta", delta)) if v is not None
        }
        if len(given) > 1:
            raise InvalidArgumentError(
                f"{cls.__name__}: give one of rho, sigma and delta, got {given!r}",
                hint="delta: spread relative to |w|; sigma: constant spread; rho: its softplus "
                "inverse (default -3).",
            )
        _check_number(cls, "min_sigma", min_sigma, minimum=0.0, strict=True)
        if delta is not None:
            _check_number(cls, "delta", delta, minimum=0.0, strict=True)
        if not _all_finite(param):
            raise InvalidArgumentError(
                f"{cls.__name__}: the weights contain NaN or infinite values",
                hint="A pretrained posterior needs finite weights; check the input model.",
            )
        if not mu.is_meta:
            mu.copy_(param)
        if delta is None:
            rho = -3.0 if rho is None else rho
            rho_out.fill_(_initial_rho(cls, rho=rho, sigma=sigma, min_sigma=min_sigma))
            return
        # Any strides in and out: `param` read, and `rho_out` written, in logical order.
        flat_w = param.reshape(-1)
        flat_rho = rho_out.view(-1) if rho_out.is_contiguous() else _empty(rho_out).view(-1)
        for a in range(0, flat_w.numel(), _SERIAL_CHUNK):
            chunk = flat_w[a : a + _SERIAL_CHUNK].to(_compute_dtype(param))
            spread = chunk.abs().mul_(delta).clamp_(min=min_sigma)
            flat_rho[a : a + _SERIAL_CHUNK] = inverse_softplus(spread)
        if not rho_out.is_contiguous():
            rho_out.copy_(flat_rho.view(rho_out.shape))


PretrainedNormalPosterior = PretrainedGaussianPosterior


def _empty(like: Tensor) -> Tensor:
    # Not empty_like: it keeps the strides of a channels_last or transposed weight.
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def _contiguous(tensor: Tensor, copy: bool) -> Tensor:
    if copy:
        return tensor.clone(memory_format=torch.contiguous_format)
    return tensor.contiguous()


def is_flat(cls: type) -> bool:
    """Whether posteriors of `cls` can live in flat Gaussian storage.

    True for Gaussian posteriors that change only the initialization (`from_param`).
    """
    return (
        isinstance(cls, type)
        and issubclass(cls, GaussianPosterior)
        and cls.sample_parameters is GaussianPosterior.sample_parameters
        and cls.distribution is GaussianPosterior.distribution
    )


def _compute_dtype(param: Tensor) -> torch.dtype:
    return torch.promote_types(param.dtype, torch.float32)


def _initial_rho(cls: type, *, rho: float, sigma: float | None, min_sigma: float = 0.0) -> float:
    """The constant initial rho: from `sigma` if given, else `rho`, floored at `min_sigma`."""
    if sigma is not None:
        _check_number(cls, "sigma", sigma, minimum=0.0, strict=True)
        target = torch.tensor(max(float(sigma), min_sigma), dtype=torch.float64)
        return float(inverse_softplus(target))
    _check_number(cls, "rho", rho)
    if min_sigma > 0 and F.softplus(torch.tensor(float(rho), dtype=torch.float64)) < min_sigma:
        return float(inverse_softplus(torch.tensor(min_sigma, dtype=torch.float64)))
    return float(rho)


def _all_finite(tensor: Tensor) -> bool:
    if tensor.is_meta or not tensor.is_floating_point():
        return True
    flat = tensor.reshape(-1)
    return all(
        bool(torch.isfinite(flat[a : a + _CHUNK]).all()) for a in range(0, flat.numel(), _CHUNK)
    )


def _check_number(
    cls: type, name: str, value: Any, *, minimum: float | None = None, strict: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise InvalidArgumentError(
            f"{cls.__name__}: {name} must be a finite number{bound}, got {value!r}",
            hint=f"Pass a valid {name} in the posterior's keyword arguments.",
        )


def init_function(cls: type) -> Any:
    """The function whose keyword arguments posterior class `cls` accepts.

    `initialize_` for Gaussian posteriors that keep the base `from_param` (which
    forwards its keyword arguments there), else `from_param` itself.
    """
    initialize = getattr(cls, "initialize_", None)
    base = GaussianPosterior.from_param.__func__
    if initialize is not None and getattr(cls.from_param, "__func__", None) is base:
        return initialize
    return cls.from_param


def accepted_kwargs(method: Any) -> list[str]:
    """Keyword arguments a `from_param` accepts (for error messages and `bnnify list`)."""
    params = inspect.signature(method).parameters.values()
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY or (p.default is not p.empty)]


def restore_posterior(
    posterior: Spec | None, state: dict[str, Tensor], like: Tensor
) -> VariationalPosterior:
    """Rebuilds a posterior for a parameter shaped like `like` from its saved `state`.

    Gaussian posteriors are rebuilt directly from `mu` and `rho`; others are built
    by `from_param` and then loaded with `state`.
    """
    name, _ = parse_spec(posterior, "gaussian", "posterior")
    cls = PosteriorFactory[name]
    if is_flat(cls):
        return cls(state["mu"], state["rho"])
    built = get_posterior(posterior, torch.zeros(like.shape, dtype=like.dtype, device=like.device))
    built.load_state_dict(state)
    return built


def initialize_into(posterior: Spec | None, mu: Tensor, rho: Tensor, param: Tensor) -> None:
    """Writes the initial `mu` and `rho` of a flat Gaussian posterior spec, in place.

    Through `initialize_` when the class has it (no temporaries of the parameter's
    size), else by building the posterior with `from_param` and copying.

    Raises:
        KeyError: (`UnknownNameError`) For an unregistered name.
        ValueError: (`InvalidArgumentError`) For invalid keyword arguments.
    """
    name, kwargs = parse_spec(posterior, "gaussian", "posterior")
    cls = PosteriorFactory[name]
    function = init_function(cls)
    if function.__func__ is cls.from_param.__func__:
        built = get_posterior(posterior, param)
        mu.copy_(built.mu)
        rho.copy_(built.rho)
        return
    try:
        function(mu, rho, param, **kwargs)
    except TypeError as error:
        accepted = accepted_kwargs(function)
        raise InvalidArgumentError(
            f"invalid arguments {kwargs!r} for posterior {name!r}: {error}",
            hint=f"{name!r} accepts: {', '.join(accepted) or 'nothing'}.",
        ) from None


def get_posterior(posterior: Spec | None, param: Tensor) -> VariationalPosterior:
    """Builds a registered posterior for `param` from a name or `(name, kwargs)` spec.

    Args:
        posterior: The spec; None means the default Gaussian posterior.
        param: The parameter the posterior replaces.

    Raises:
        KeyError: (`UnknownNameError`) For an unregistered name.
        ValueError: (`InvalidArgumentError`) For invalid keyword arguments.
    """
    name, kwargs = parse_spec(posterior, "gaussian", "posterior")
    cls = PosteriorFactory[name]
    try:
        return cls.from_param(param, **kwargs)
    except TypeError as error:
        accepted = accepted_kwargs(init_function(cls))
        raise InvalidArgumentError(
            f"invalid arguments {kwargs!r} for posterior {name!r}: {error}",
            hint=f"{name!r} accepts: {', '.join(accepted) or 'nothing'}.",
        ) from None
