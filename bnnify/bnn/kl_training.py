"""KL(posterior || prior) for training: fused chunked kernels over flat stores, and the rest.

Reports (reproducible to the last bit) use `bnnify.bnn.kl_report` instead.

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
    "DEFAULT_MC_SAMPLES",
    "Segment",
    "default_samples",
    "distribution_kl",
    "gaussian_scalars",
    "has_flat_log_prob",
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
    `gaussian` holds `(mu, sigma)` when the prior is a Gaussian with scalar
    parameters, which has a hand-fused kernel.
    """

    start: int
    end: int
    prior: Prior
    base: int
    gaussian: tuple[float, float] | None = None


FAST_CHUNK = 1 << 18


def _compute(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class _GaussianKL(torch.autograd.Function):
    """Closed-form KL to scalar Gaussian priors, by sums instead of elementwise terms.

    Per segment with prior N(m, s^2) and n elements:
        KL = n (log s - 1/2) + (sum (mu - m)^2 + sum sigma^2) / (2 s^2) - sum log sigma
    The sums of squares are dot products (no temporaries), `sigma` is reused from
    the last sample when `rho` has not changed since, and the backward pass writes
    the gradients chunk by chunk, in cache.
    """

    @staticmethod
    def forward(ctx: Any, mu: Tensor, rho: Tensor, segments: tuple, sigma: Tensor | None) -> Tensor:
        total = torch.zeros((), dtype=torch.float64, device=mu.device)
        for segment in segments:
            m, s = segment.gaussian
            # Per-chunk partial sums, added up once at the end: fewer tiny kernels.
            squares, logs = [], []
            for a in range(segment.start, segment.end, FAST_CHUNK):
                b = min(a + FAST_CHUNK, segment.end)
                d = _compute(mu[a:b])
                d = d if m == 0.0 else d - m
                squares.append(torch.dot(d, d))
                if sigma is not None:
                    sig = _compute(sigma[a:b])
                    squares.append(torch.dot(sig, sig))
                    logs.append(torch.log(sig).sum())
                else:
                    sig = F.softplus(_compute(rho[a:b]))
                    squares.append(torch.dot(sig, sig))
                    logs.append(sig.log_().sum())  # a temporary of ours: log in place
            n = segment.end - segment.start
            square_sum = torch.stack(squares).double().sum()
            log_sum = torch.stack(logs).double().sum()
            total += n * (math.log(s) - 0.5) + square_sum / (2 * s * s) - log_sum
        ctx.segments = segments
        ctx.save_for_backward(mu, rho)
        ctx.sigma = sigma
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        mu, rho = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: differentiable gradients, for double backward.
            return (*_gaussian_kl_gradients(mu, rho, ctx.segments, grad), None, None)
        sigma = ctx.sigma
        covered = sum(s.end - s.start for s in ctx.segments) == mu.numel()
        grad_mu = torch.empty_like(mu) if covered else torch.zeros_like(mu)
        grad_rho = torch.empty_like(rho) if covered else torch.zeros_like(rho)
        g = grad.to(torch.promote_types(mu.dtype, torch.float32))
        for segment in ctx.segments:
            m, s = segment.gaussian
            for a in range(segment.start, segment.end, FAST_CHUNK):
                b = min(a + FAST_CHUNK, segment.end)
                mu_c, rho_c = _compute(mu[a:b]), _compute(rho[a:b])
                sig = _compute(sigma[a:b]) if sigma is not None else F.softplus(rho_c)
                same = mu_c.dtype == mu.dtype
                out_mu = grad_mu[a:b] if same else torch.empty_like(mu_c)
                out_rho = grad_rho[a:b] if same else torch.empty_like(rho_c)
                # d/dmu = (mu - m) / s^2;  d/drho = (sigma / s^2 - 1 / sigma) sigmoid(rho)
                torch.sub(mu_c, m, out=out_mu).mul_(g / (s * s))
                torch.reciprocal(sig, out=out_rho).neg_().add_(sig, alpha=1 / (s * s))
                out_rho.mul_(torch.sigmoid(rho_c)).mul_(g)
                if not same:
                    grad_mu[a:b] = out_mu
                    grad_rho[a:b] = out_rho
        return grad_mu, grad_rho, None, None


def _gaussian_kl_gradients(
    mu: Tensor, rho: Tensor, segments: Sequence[Segment], grad: Tensor
) -> tuple[Tensor, Tensor]:
    """The gradients of `_GaussianKL` built from autograd ops (model-sized temporaries)."""
    grad_mu, grad_rho = torch.zeros_like(mu), torch.zeros_like(rho)
    for segment in segments:
        m, s = segment.gaussian
        a, b = segment.start, segment.end
        mu_c, rho_c = _compute(mu[a:b]), _compute(rho[a:b])
        sig = F.softplus(rho_c)
        g_mu = grad * (mu_c - m) / (s * s)
        g_rho = grad * (sig / (s * s) - 1 / sig) * torch.sigmoid(rho_c)
        grad_mu = grad_mu.slice_scatter(g_mu.to(mu.dtype), start=a, end=b)
        grad_rho = grad_rho.slice_scatter(g_rho.to(rho.dtype), start=a, end=b)
    return grad_mu, grad_rho


def gaussian_scalars(prior: Prior) -> tuple[float, float] | None:
    """`(mu, sigma)` of a Gaussian prior with scalar parameters (fused kernel), else None."""
    from bnnify.bnn.priors import GaussianPrior

    if (
        not isinstance(prior, GaussianPrior)
        or type(prior).gaussian_kl is not GaussianPrior.gaussian_kl
    ):
        return None
    if prior.mu.numel() != 1 or prior.sigma.numel() != 1 or prior.mu.is_meta:
        return None
    return float(prior.mu), float(prior.sigma)


def has_flat_log_prob(prior: Prior) -> bool:
    """Whether `prior` evaluates its log-density on flat chunks (fused Monte Carlo KL)."""
    return type(prior).flat_log_prob is not Prior.flat_log_prob


DEFAULT_MC_SAMPLES = 16


def default_samples(posterior: Any, prior: Prior) -> int | None:
    """None where a closed form exists for the pair, else `DEFAULT_MC_SAMPLES`."""
    from bnnify.bnn.posteriors import is_flat

    if is_flat(type(posterior)) and has_gaussian_closed_form(prior):
        return None
    probe_q, probe_p = posterior.distribution, prior.distribution
    return None if pair_has_closed_form(probe_q, probe_p) else DEFAULT_MC_SAMPLES


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
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the recomputed terms with a graph, so
            # that the gradients are differentiable too (same chunks, same noise).
            total = torch.zeros((), dtype=torch.float64, device=mu.device)
            for segment, a, b in _chunks(segments, size):
                terms = _chunk_terms(mu[a:b], rho[a:b], segment, a, num_samples, seed)
                total = total + terms.sum(dtype=torch.float64)
            g_mu, g_rho = torch.autograd.grad(
                total, (mu, rho), grad, create_graph=True, materialize_grads=True
            )
            return g_mu, g_rho, None
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
    mu: Tensor,
    rho: Tensor,
    segments: Sequence[Segment],
    num_samples: int | None,
    sigma: Tensor | None = None,
) -> Tensor:
    """KL summed over `segments` of a flat store (float64, 0-dim, differentiable).

    Closed form when `num_samples` is None (every prior must define `gaussian_kl`),
    else a Monte Carlo estimate with `num_samples` samples per element. `sigma`,
    if given, is softplus(rho) already computed (flat, whole store).
    """
    if num_samples is None and all(s.gaussian is not None for s in segments):
        if torch.compiler.is_compiling():
            return _store_kl_unchunked(mu, rho, segments, None, 0)
        return _GaussianKL.apply(mu, rho, tuple(segments), sigma)
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
