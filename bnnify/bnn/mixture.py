"""The regression predictive (1/S) sum_s N(f_s(x), noise^2): its CDF, quantiles and CRPS."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bnnify.errors import InputError, InvalidArgumentError

__all__ = ["gaussian_mixture_cdf", "gaussian_mixture_crps", "gaussian_mixture_quantile"]

# Elements of the largest temporary of the O(S) and O(S^2) computations, chunked over targets.
_CHUNK = 1 << 22
# Quantiles stop when a step is below this fraction of the smallest component scale, or a
# few float64 steps of the quantile itself; bisection alone would need about 50 halvings.
_TOLERANCE = 1e-12
_ULPS = 4 * torch.finfo(torch.float64).eps
_MAX_STEPS = 200
_PATIENCE = 4


def _components(samples: Tensor, noise: float | Tensor) -> tuple[Tensor, Tensor]:
    """Means and scales `(S, M)` in float64 of the mixture of each of the M scalar outputs."""
    if samples.dim() < 2 or samples.shape[0] == 0 or samples.shape[1] == 0:
        raise InputError(
            f"predictions need the shape (samples, examples, ...); got {tuple(samples.shape)}"
        )
    scale = torch.as_tensor(noise, dtype=torch.float64)
    try:
        scale = torch.broadcast_to(scale, samples.shape)
    except RuntimeError:
        raise InvalidArgumentError(
            f"a noise scale of shape {tuple(scale.shape)} does not broadcast to the "
            f"predictions' {tuple(samples.shape)}",
            hint="Give one scale, or one per sample, example or output.",
        ) from None
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise InvalidArgumentError(
            f"the noise scale must be positive and finite; found min {float(scale.min())}",
            hint="Metrics of a Gaussian predictive need a fitted noise scale (run `fit`).",
        )
    s = samples.shape[0]
    return samples.double().reshape(s, -1), scale.reshape(s, -1)


def _targets(samples: Tensor, y: Tensor) -> Tensor:
    if y.dim() == 0 or y.shape[0] != samples.shape[1] or y.numel() != samples[0].numel():
        raise InputError(
            f"targets of shape {tuple(y.shape)} do not match predictions of shape "
            f"{tuple(samples.shape[1:])}",
            hint="Give one row per example and one target per model output.",
        )
    return y.double().reshape(-1)


def _by_columns(fn: Callable[..., Tensor], *tensors: Tensor, per_column: int) -> Tensor:
    """`fn` over column chunks (last axis) so that its temporaries stay near `_CHUNK`."""
    step = max(1, _CHUNK // max(per_column, 1))
    width = tensors[0].shape[-1]
    parts = [fn(*(t[..., i : i + step] for t in tensors)) for i in range(0, width, step)]
    return torch.cat(parts, -1)


def _cdf(x: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    return torch.special.ndtr((x.unsqueeze(-2) - loc) / scale).mean(-2)


def gaussian_mixture_cdf(samples: Tensor, noise: float | Tensor, y: Tensor) -> Tensor:
    """F(y) of the predictive (1/S) sum_s N(f_s(x), noise^2) of each scalar output.

    This is the probability integral transform: uniform on (0, 1) when the predictive
    is calibrated; y lies in the central interval of level c iff |F(y) - 1/2| <= c/2.

    Args:
        samples: Outputs `(S, batch, ...)` of S weight samples; a single Gaussian
            N(mean, std^2) is `samples=mean[None]`, `noise=std[None]`.
        noise: Scale(s) broadcastable to `samples`.
        y: Targets, one row per example.

    Returns:
        `(batch, ...)` like one sample, float64.
    """
    loc, scale = _components(samples, noise)
    pit = _by_columns(_cdf, _targets(samples, y), loc, scale, per_column=loc.shape[0])
    return pit.reshape(samples.shape[1:])


def _gap(x: Tensor, p: Tensor, loc: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """F(x) - p and the density F'(x) of each mixture at points `x` `(L, M)`."""
    z = (x.unsqueeze(-2) - loc) / scale
    gap = torch.special.ndtr(z).mean(-2) - p[:, None]
    density = (z.square_().mul_(-0.5).exp_() / scale).mean(-2) / math.sqrt(2 * math.pi)
    return gap, density


def _solve(p: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """x with F(x) = p: Newton's method kept inside a bracket that every step shrinks.

    A Newton step that leaves the bracket is replaced by the secant of the bracket (regula
    falsi), and a bracket that has not halved in `_PATIENCE` steps is bisected, so the
    search always converges, quadratically once Newton takes over.
    """
    # F(min_s q_s(p)) <= p <= F(max_s q_s(p)): the component quantiles bracket the mixture's.
    ends = loc + scale * torch.special.ndtri(p)[:, None, None]
    low, high = ends.amin(1), ends.amax(1)
    g_low, g_high = _gap(low, p, loc, scale)[0], _gap(high, p, loc, scale)[0]
    tolerance = _TOLERANCE * scale.amin(0)
    x, width = ends.mean(1), high - low
    done = torch.zeros_like(x, dtype=torch.bool)
    for step in range(1, _MAX_STEPS + 1):
        gap, density = _gap(x, p, loc, scale)
        below = gap < 0
        low, g_low = torch.where(below, x, low), torch.where(below, gap, g_low)
        high, g_high = torch.where(below, high, x), torch.where(below, g_high, gap)
        newton = x - gap / density
        # Rounding can leave both ends on one side of p, or one point (one component).
        secant = (low - g_low * (high - low) / (g_high - g_low)).clamp(low, high)
        secant = torch.where(g_high > g_low, secant, 0.5 * (low + high))
        new = torch.where((newton > low) & (newton < high), newton, secant)
        small = (new - x).abs() <= torch.maximum(tolerance, _ULPS * x.abs())
        if step % _PATIENCE == 0:
            slow = (high - low > 0.5 * width) & ~small
            new, width = torch.where(slow, 0.5 * (low + high), new), high - low
            small &= ~slow
        x, done = torch.where(done, x, new), done | small
        if bool(done.all()):
            break
    return x


def gaussian_mixture_quantile(
    samples: Tensor, noise: float | Tensor, levels: Sequence[float] | Tensor
) -> Tensor:
    """Quantiles q_p of the predictive mixture of each scalar output.

    Solved on the mixture's CDF by Newton's method safeguarded by regula falsi and
    bisection inside the bracket [min_s q_s(p), max_s q_s(p)] of component quantiles, to
    1e-12 of the smallest component scale.

    Returns:
        `(len(levels), batch, ...)`, float64.

    Example:
        >>> q = gaussian_mixture_quantile(torch.zeros(1, 1), 2.0, [0.5, 0.975])
        >>> [round(v, 4) for v in q.flatten().tolist()]
        [0.0, 3.9199]
    """
    loc, scale = _components(samples, noise)
    p = torch.as_tensor(levels, dtype=torch.float64).reshape(-1)
    if not ((p > 0) & (p < 1)).all():
        raise InvalidArgumentError(f"quantile levels must lie in (0, 1); got {p.tolist()}")
    per_column = 4 * loc.shape[0] * p.numel()
    q = _by_columns(lambda m, s: _solve(p, m, s), loc, scale, per_column=per_column)
    return q.reshape(p.numel(), *samples.shape[1:])


def _abs_moment(m: Tensor, s: Tensor) -> Tensor:
    """E|Z| = m (2 Phi(m/s) - 1) + 2 s phi(m/s) for Z ~ N(m, s^2)."""
    z = m / s
    out = torch.special.erf(z * math.sqrt(0.5)).mul_(m)
    return out.add_(z.square_().mul_(-0.5).exp_().mul_(s), alpha=math.sqrt(2 / math.pi))


def _crps(y: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    s = loc.shape[0]
    i, j = torch.triu_indices(s, s, 1)
    pairs = _abs_moment(loc[i] - loc[j], (scale[i].square() + scale[j].square()).sqrt()).sum(0)
    # A pair i = j: E|Z| of N(0, 2 s_i^2) is 2 s_i / sqrt(pi).
    spread = (2 * pairs + scale.sum(0) * (2 / math.sqrt(math.pi))) / s**2
    return _abs_moment(y - loc, scale).mean(0) - 0.5 * spread


def gaussian_mixture_crps(samples: Tensor, noise: float | Tensor, y: Tensor) -> Tensor:
    """Continuous ranked probability score of the predictive mixture, exact, per scalar output.

    CRPS(F, y) = E|X - y| - E|X - X'| / 2 with X, X' ~ F independent. For a mixture of
    Gaussians both terms are sums of E|Z| = m (2 Phi(m/s) - 1) + 2 s phi(m/s) over
    components (X - y) and pairs of components (X - X' ~ N(mu_i - mu_j, s_i^2 + s_j^2)):
    O(S^2) per output, computed in chunks. Lower is better; same unit as y.

    Example:
        >>> # A standard normal at y = 0: 2 phi(0) - 1/sqrt(pi) = (sqrt(2) - 1) / sqrt(pi).
        >>> round(float(gaussian_mixture_crps(torch.zeros(1, 1), 1.0, torch.zeros(1))), 6)
        0.233695
    """
    loc, scale = _components(samples, noise)
    per_column = 2 * loc.shape[0] ** 2
    crps = _by_columns(_crps, _targets(samples, y), loc, scale, per_column=per_column)
    return crps.reshape(samples.shape[1:])
