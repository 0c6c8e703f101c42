"""Priors p(w) over one parameter tensor, and the registry `PriorFactory`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Laplace, MixtureSameFamily, Normal

from bnnify.bnn.registry import Factory, Spec, parse_spec
from bnnify.errors import InvalidArgumentError

__all__ = [
    "EmpiricalGaussianPrior",
    "GaussianPrior",
    "LaplacePrior",
    "NormalPrior",
    "Prior",
    "PriorFactory",
    "ScaleMixturePrior",
    "get_prior",
]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class Prior(nn.Module):
    """Base class of priors over the elements of one parameter tensor.

    Subclasses are built as `cls(shape=..., dtype=..., device=..., **kwargs)` and
    expose `distribution`. Their tensor arguments are stored as buffers, so they are
    saved in `state_dict()` and follow `.to()`. Scalars stay 0-dim and broadcast:
    no prior tensor of the parameter's size is ever built unless the user passes one.

    Two optional methods make a prior fast inside a `BayesianModule`:
    `gaussian_kl` (closed-form KL from a Gaussian posterior, elementwise) and
    `flat_log_prob` (elementwise log-density, used by the Monte Carlo KL).

    A subclass written for torchbayesian, where `Prior` is a plain class, may skip
    `super().__init__()`: `__new__` sets up the `nn.Module` machinery first. Its
    plain tensor attributes are then neither saved nor moved by `.to()` (as there),
    and the KL still comes out in the dtype of `BayesianModule._kl_meta`.

    Args:
        shape: Shape of the parameter the prior is placed on.
        dtype: Floating-point dtype of the prior's tensors.
        device: Device of the prior's tensors.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Prior:
        self = super().__new__(cls)
        nn.Module.__init__(self)
        return self

    def __init__(
        self,
        shape: Sequence[int] = (),
        dtype: torch.dtype | None = None,
        device: torch.device | str | int | None = None,
    ):
        # No super().__init__(): __new__ did it, and buffers registered by a subclass
        # before calling this must survive.
        self.shape = torch.Size(shape)
        self._factory = {"dtype": _prior_dtype(dtype), "device": device}

    @classmethod
    def from_param(cls, param: Tensor, **kwargs: Any) -> Prior:
        """Builds the prior for `param` (its shape, dtype and device)."""
        return cls(shape=param.shape, dtype=param.dtype, device=param.device, **kwargs)

    @property
    def distribution(self) -> Distribution:
        """The prior as a `torch.distributions.Distribution`."""
        raise NotImplementedError(f"{type(self).__name__} must define `distribution`")

    def gaussian_kl(self, mu: Tensor, sigma: Tensor, index: slice) -> Tensor | None:
        """Elementwise KL(N(mu, sigma^2) || prior) over the flattened elements `index`.

        Returns None where no closed form exists (the Monte Carlo path is used).
        """
        return None

    def flat_log_prob(self, value: Tensor, index: slice) -> Tensor | None:
        """Elementwise log-density of `value`, the flattened elements `index`.

        Returns None where the prior does not support flat evaluation; the Monte
        Carlo KL then evaluates `distribution.log_prob` on the parameter's shape.
        """
        return None

    def _tensor(self, value: Any, name: str, *, positive: bool = False) -> Tensor:
        """Converts a float or tensor argument to a buffer-ready tensor, validating it."""
        if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
            raise InvalidArgumentError(
                f"{type(self).__name__}: {name} must be a number or a tensor, got {value!r}"
            )
        tensor = torch.as_tensor(value, **self._factory).detach()
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        if not tensor.is_floating_point():
            tensor = tensor.to(torch.get_default_dtype())
        if tensor.is_meta:
            return tensor
        if not torch.isfinite(tensor).all():
            raise InvalidArgumentError(
                f"{type(self).__name__}: {name} must be finite, got {_show(value)}"
            )
        if positive and not (tensor > 0).all():
            raise InvalidArgumentError(
                f"{type(self).__name__}: {name} must be > 0, got {_show(value)}",
                hint=f"Pass a positive {name}, for example {name}=1.0.",
            )
        if not _broadcasts(tensor.shape, self.shape):
            raise InvalidArgumentError(
                f"{type(self).__name__}: {name} of shape {tuple(tensor.shape)} does not "
                f"broadcast to the parameter's shape {tuple(self.shape)}"
            )
        return tensor

    def _flat(self, tensor: Tensor, index: slice, like: Tensor) -> Tensor:
        """The elements `index` of `tensor` broadcast to the parameter, flattened."""
        if tensor.numel() == 1:
            return tensor.reshape(()).to(like.dtype)
        return tensor.expand(self.shape).reshape(-1)[index].to(like.dtype)

    def extra_repr(self) -> str:
        parts = []
        for name, buf in self.named_buffers(recurse=False):
            parts.append(f"{name}={_show(buf)}")
        return ", ".join(parts)


def _broadcasts(shape: Sequence[int], other: Sequence[int]) -> bool:
    """`torch.broadcast_shapes(shape, other)` succeeds (it costs 0.3 ms a call)."""
    pairs = zip(reversed(shape), reversed(other), strict=False)
    return all(a == b or a == 1 or b == 1 for a, b in pairs)


def _prior_dtype(dtype: torch.dtype | None) -> torch.dtype:
    # Low-precision parameters keep float32 priors: sigma2 = e^-6 is not representable in bf16.
    if dtype is None or dtype in (torch.float16, torch.bfloat16):
        return torch.get_default_dtype() if dtype is None else torch.float32
    return dtype


def _show(value: Any) -> str:
    if isinstance(value, Tensor):
        return (
            f"{value.item():g}" if value.numel() == 1 else f"tensor of shape {tuple(value.shape)}"
        )
    return repr(value)


PriorFactory: Factory[Prior] = Factory("prior", Prior)


@PriorFactory.register("gaussian")
@PriorFactory.register("normal")
class GaussianPrior(Prior):
    """N(mu, sigma^2); closed-form KL.

    A Gaussian prior, elementwise.

    Args:
        mu: Mean (float or tensor broadcastable to the parameter).
        sigma: Standard deviation, > 0.

    Example:
        >>> prior = GaussianPrior(shape=(3,), sigma=0.5)
        >>> prior.distribution.stddev
        tensor([0.5000, 0.5000, 0.5000])
    """

    def __init__(
        self,
        shape: Sequence[int] = (),
        dtype: torch.dtype | None = None,
        device: torch.device | str | int | None = None,
        *,
        mu: float | Tensor = 0.0,
        sigma: float | Tensor = 1.0,
    ):
        super().__init__(shape, dtype, device)
        self.register_buffer("mu", self._tensor(mu, "mu"))
        self.register_buffer("sigma", self._tensor(sigma, "sigma", positive=True))

    @property
    def distribution(self) -> Distribution:
        return Normal(self.mu, self.sigma, validate_args=False).expand(self.shape)

    def gaussian_kl(self, mu: Tensor, sigma: Tensor, index: slice) -> Tensor:
        prior_mu = self._flat(self.mu, index, mu)
        prior_sigma = self._flat(self.sigma, index, mu)
        ratio = sigma / prior_sigma
        return 0.5 * (ratio.square() + ((mu - prior_mu) / prior_sigma).square() - 1) - ratio.log()

    def flat_log_prob(self, value: Tensor, index: slice) -> Tensor:
        prior_mu = self._flat(self.mu, index, value)
        prior_sigma = self._flat(self.sigma, index, value)
        z = (value - prior_mu) / prior_sigma
        return -0.5 * z.square() - prior_sigma.log() - _LOG_SQRT_2PI


NormalPrior = GaussianPrior


@PriorFactory.register("empirical_gaussian")
class EmpiricalGaussianPrior(GaussianPrior):
    """N(w0, sigma^2) centred on the pretrained weights (empirical Bayes); closed-form KL.

    An empirical-Bayes Gaussian prior, built from the parameter it is placed on: the
    mean is a copy of its values at conversion time (one tensor of the parameter's
    size, stored once).

    Args:
        sigma: Standard deviation, > 0.
    """

    @classmethod
    def from_param(cls, param: Tensor, **kwargs: Any) -> Prior:
        if "mu" in kwargs:
            raise InvalidArgumentError(
                "empirical_gaussian takes its mean from the weights; got an explicit 'mu'",
                hint="Use the 'gaussian' prior to choose the mean yourself.",
            )
        return cls(
            shape=param.shape, dtype=param.dtype, device=param.device, mu=param.detach(), **kwargs
        )


@PriorFactory.register("laplace")
class LaplacePrior(Prior):
    """Laplace(mu, scale); closed-form KL from a Gaussian posterior.

    The density is exp(-|w - mu| / scale) / (2 scale), elementwise. Its KL divergence
    from a Gaussian posterior N(m, s^2) has a closed form; with d = m - mu:

        KL = log(2 scale / s) - (1 + log(2 pi)) / 2
             + (s sqrt(2/pi) exp(-d^2 / (2 s^2)) + d erf(d / (s sqrt 2))) / scale

    (the last term is E|w - mu| / scale, the mean of a folded normal).

    Args:
        mu: Location.
        scale: Scale b > 0 (the standard deviation is b sqrt 2).
    """

    def __init__(
        self,
        shape: Sequence[int] = (),
        dtype: torch.dtype | None = None,
        device: torch.device | str | int | None = None,
        *,
        mu: float | Tensor = 0.0,
        scale: float | Tensor = 1.0,
    ):
        super().__init__(shape, dtype, device)
        self.register_buffer("mu", self._tensor(mu, "mu"))
        self.register_buffer("scale", self._tensor(scale, "scale", positive=True))

    @property
    def distribution(self) -> Distribution:
        return Laplace(self.mu, self.scale, validate_args=False).expand(self.shape)

    def gaussian_kl(self, mu: Tensor, sigma: Tensor, index: slice) -> Tensor:
        loc = self._flat(self.mu, index, mu)
        scale = self._flat(self.scale, index, mu)
        return laplace_gaussian_kl(mu, sigma, loc, scale)

    def flat_log_prob(self, value: Tensor, index: slice) -> Tensor:
        loc = self._flat(self.mu, index, value)
        scale = self._flat(self.scale, index, value)
        return -(value - loc).abs() / scale - (2 * scale).log()


def laplace_gaussian_kl(mu: Tensor, sigma: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """Elementwise KL(N(mu, sigma^2) || Laplace(loc, scale)) in closed form."""
    d = mu - loc
    folded_mean = sigma * math.sqrt(2 / math.pi) * torch.exp(
        -0.5 * (d / sigma).square()
    ) + d * torch.erf(d / (sigma * math.sqrt(2)))
    return torch.log(2 * scale / sigma) - 0.5 * (1 + math.log(2 * math.pi)) + folded_mean / scale


@torch.distributions.kl.register_kl(Normal, Laplace)
def _kl_normal_laplace(p: Normal, q: Laplace) -> Tensor:
    return laplace_gaussian_kl(p.loc, p.scale, q.loc, q.scale)


@PriorFactory.register("scale_mixture")
class ScaleMixturePrior(Prior):
    """pi N(0, sigma1^2) + (1 - pi) N(0, sigma2^2) (Blundell et al.); Monte Carlo KL.

    A scale mixture of two zero-mean Gaussians (Blundell et al., 2015), elementwise:
    p(w) = pi N(w; 0, sigma1^2) + (1 - pi) N(w; 0, sigma2^2), with sigma1 > sigma2
    usually: a wide component and a spike near zero. Its KL divergence from a
    Gaussian posterior has no closed form: pass `approx_num_samples`.

    Args:
        pi: Weight of the first component, in (0, 1).
        sigma1: Standard deviation of the first component, > 0.
        sigma2: Standard deviation of the second component, > 0.
    """

    def __init__(
        self,
        shape: Sequence[int] = (),
        dtype: torch.dtype | None = None,
        device: torch.device | str | int | None = None,
        *,
        pi: float = 0.5,
        sigma1: float = 1.0,
        sigma2: float = math.exp(-6),
    ):
        super().__init__(shape, dtype, device)
        if not isinstance(pi, (int, float)) or not 0.0 < float(pi) < 1.0:
            raise InvalidArgumentError(
                f"ScaleMixturePrior: pi must be a number in (0, 1), got {pi!r}",
                hint="Blundell et al. use pi in {0.25, 0.5, 0.75}.",
            )
        self.register_buffer("pi", self._tensor(float(pi), "pi"))
        self.register_buffer("sigma1", self._tensor(sigma1, "sigma1", positive=True))
        self.register_buffer("sigma2", self._tensor(sigma2, "sigma2", positive=True))

    @property
    def distribution(self) -> Distribution:
        mixture = Categorical(probs=torch.stack([self.pi, 1 - self.pi]), validate_args=False)
        # Components on the last dimension, as MixtureSameFamily expects; tensor scales broadcast.
        scales = torch.stack(torch.broadcast_tensors(self.sigma1, self.sigma2), dim=-1)
        components = Normal(torch.zeros_like(scales), scales, validate_args=False)
        return MixtureSameFamily(mixture, components, validate_args=False).expand(self.shape)

    def flat_log_prob(self, value: Tensor, index: slice) -> Tensor:
        log_pi = self._flat(self.pi, index, value).log()
        log_1mpi = torch.log1p(-self._flat(self.pi, index, value))
        s1 = self._flat(self.sigma1, index, value)
        s2 = self._flat(self.sigma2, index, value)
        lp1 = log_pi - 0.5 * (value / s1).square() - s1.log()
        lp2 = log_1mpi - 0.5 * (value / s2).square() - s2.log()
        # log(e^lp1 + e^lp2) by hand: torch.logaddexp's double backward is NaN where
        # the two differ by hundreds, as a narrow spike makes them.
        return torch.maximum(lp1, lp2) + (lp1 - lp2).abs().neg().exp().log1p() - _LOG_SQRT_2PI


def get_prior(prior: Spec | None, param: Tensor | None = None, **factory: Any) -> Prior:
    """Builds a registered prior from a name or `(name, kwargs)` spec.

    Args:
        prior: The spec; None means the default Gaussian N(0, 1).
        param: The parameter the prior is placed on (gives shape, dtype and device).
        **factory: `shape`, `dtype`, `device` when no `param` is given.

    Raises:
        KeyError: (`UnknownNameError`) For an unregistered name.
        ValueError: (`InvalidArgumentError`) For invalid keyword arguments.
    """
    name, kwargs = parse_spec(prior, "gaussian", "prior")
    cls = PriorFactory[name]
    try:
        if param is not None:
            return cls.from_param(param, **kwargs)
        return cls(**factory, **kwargs)
    except TypeError as error:
        raise InvalidArgumentError(
            f"invalid arguments {kwargs!r} for prior {name!r}: {error}",
            hint=f"Run `bnnify list` to see the arguments {name!r} accepts.",
        ) from None
