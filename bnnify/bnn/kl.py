"""KL(posterior || prior): fused chunked kernels over flat stores, and the generic path.

Memory of one `kl_divergence()` call over a flat store: no tensor of the model's
size is built in the forward pass (the store is reduced chunk by chunk, chunks of
`CHUNK` elements, or `CHUNK / num_samples` for Monte Carlo); the backward pass
writes the two gradients (the size of `mu` and `rho`, which the optimizer needs
anyway) and recomputes each chunk's terms instead of saving them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution, kl_divergence

from bnnify.bnn.priors import Prior

__all__ = [
    "CHUNK",
    "Segment",
    "distribution_kl",
    "has_gaussian_closed_form",
    "monte_carlo_warning",
    "pair_has_closed_form",
    "store_kl",
]

CHUNK = 1 << 16
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class Segment:
    """Elements `[start, end)` of a flat store under one prior.

    `base` is the flat offset of the prior's own parameter, so that element `i` of
    the store is element `i - base` of the prior (irrelevant for scalar priors).
    """

    start: int
    end: int
    prior: Prior
    base: int


def has_gaussian_closed_form(prior: Prior) -> bool:
    """Whether `prior` defines the fused closed-form KL from a Gaussian posterior."""
    return type(prior).gaussian_kl is not Prior.gaussian_kl


def monte_carlo_warning(what: str) -> None:
    warnings.warn(
        f"a closed-form KL divergence exists for {what}; using the Monte Carlo estimate "
        "because approx_num_samples was given",
        UserWarning,
        stacklevel=5,
    )


def _chunk_terms(
    mu: Tensor, rho: Tensor, segment: Segment, start: int, num_samples: int | None, seed: int
) -> Tensor:
    """Elementwise KL terms of store elements `[start, start + len(mu))`."""
    compute = torch.promote_types(mu.dtype, torch.float32)
    mu, rho = mu.to(compute), rho.to(compute)
    sigma = F.softplus(rho)
    index = slice(start - segment.base, start - segment.base + mu.numel())
    if num_samples is None:
        return segment.prior.gaussian_kl(mu, sigma, index)
    generator = torch.Generator(device=mu.device).manual_seed(seed + start)
    eps = torch.randn(
        (num_samples, mu.numel()), generator=generator, dtype=compute, device=mu.device
    )
    w = mu + sigma * eps
    log_q = -0.5 * eps.square() - sigma.log() - _LOG_SQRT_2PI
    return (log_q - segment.prior.flat_log_prob(w, index)).mean(0)


def _chunks(segments: Sequence[Segment], size: int):
    for segment in segments:
        for start in range(segment.start, segment.end, size):
            yield segment, start, min(start + size, segment.end)


class _StoreKL(torch.autograd.Function):
    """Sum of KL terms over segments of a store, chunked, recomputed in backward."""

    @staticmethod
    def forward(ctx: Any, mu: Tensor, rho: Tensor, plan: tuple) -> Tensor:
        segments, num_samples, seed, size = plan
        total = torch.zeros((), dtype=torch.float64, device=mu.device)
        for segment, start, end in _chunks(segments, size):
            terms = _chunk_terms(mu[start:end], rho[start:end], segment, start, num_samples, seed)
            total += terms.sum(dtype=torch.float64)
        ctx.plan = plan
        ctx.save_for_backward(mu, rho)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        mu, rho = ctx.saved_tensors
        segments, num_samples, seed, size = ctx.plan
        grad_mu = torch.zeros_like(mu)
        grad_rho = torch.zeros_like(rho)
        for segment, start, end in _chunks(segments, size):
            with torch.enable_grad():
                mu_c = mu[start:end].detach().requires_grad_()
                rho_c = rho[start:end].detach().requires_grad_()
                terms = _chunk_terms(mu_c, rho_c, segment, start, num_samples, seed)
                g_mu, g_rho = torch.autograd.grad(terms.sum(), (mu_c, rho_c))
            grad_mu[start:end] = g_mu
            grad_rho[start:end] = g_rho
        scale = grad.to(mu.dtype)
        return grad_mu.mul_(scale), grad_rho.mul_(scale), None


def store_kl(
    mu: Tensor, rho: Tensor, segments: Sequence[Segment], num_samples: int | None
) -> Tensor:
    """KL summed over `segments` of a flat store (float64, 0-dim, differentiable).

    Closed form when `num_samples` is None (every prior must define `gaussian_kl`),
    else a Monte Carlo estimate with `num_samples` samples per element.
    """
    seed = 0
    if num_samples is not None:
        seed = int(torch.randint(0, 2**40, (), device="cpu"))
    size = CHUNK if num_samples is None else max(CHUNK // num_samples, 1024)
    if torch.compiler.is_compiling():
        return _store_kl_unchunked(mu, rho, segments, num_samples, seed)
    return _StoreKL.apply(mu, rho, (tuple(segments), num_samples, seed, size))


def _store_kl_unchunked(
    mu: Tensor, rho: Tensor, segments: Sequence[Segment], num_samples: int | None, seed: int
) -> Tensor:
    # Under torch.compile the whole expression is fused into one kernel anyway.
    total = torch.zeros((), dtype=torch.float64, device=mu.device)
    for segment in segments:
        a, b = segment.start, segment.end
        terms = _chunk_terms(mu[a:b], rho[a:b], segment, a, num_samples, seed)
        total = total + terms.sum(dtype=torch.float64)
    return total


def distribution_kl(
    posterior: Distribution,
    prior: Distribution,
    num_samples: int | None,
    log_prior: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """KL(posterior || prior) summed over elements, closed form or Monte Carlo.

    Raises:
        NotImplementedError: If `num_samples` is None and torch has no closed form
            registered for the pair.
    """
    if num_samples is None:
        return kl_divergence(posterior, prior).sum()
    w = posterior.rsample((num_samples,))
    log_p = prior.log_prob(w) if log_prior is None else log_prior(w)
    return (posterior.log_prob(w) - log_p).mean(0).sum()


_CLOSED: dict[tuple[type, type], bool] = {}


def pair_has_closed_form(posterior: Distribution, prior: Distribution) -> bool:
    """Whether torch has a closed form registered for the pair (cached per type pair)."""
    key = (type(posterior), type(prior))
    if key not in _CLOSED:
        try:
            kl_divergence(posterior, prior)
            _CLOSED[key] = True
        except NotImplementedError:
            _CLOSED[key] = False
    return _CLOSED[key]
