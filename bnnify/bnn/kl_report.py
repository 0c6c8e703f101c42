"""KL divergences for reports: float64, added in one fixed order on any thread count.

The training kernels of `bnnify.bnn.kl_training` are fast, and their last digits depend on the
thread count and on memory alignment (BLAS dot products, threaded sums). A report
must not: `bnnify convert` writes it, `bnnify kl` recomputes it, `kl_by_parameter`
gives it from a live module, and all three must agree to the last bit.

So each parameter is cut into chunks of at most `REPORT_CHUNK` elements, counted
from its first element. A chunk is copied into a fresh float64 tensor (the source's
alignment cannot matter) small enough that torch runs every elementwise kernel on
one thread, always with the same split between vector body and scalar tail. Terms
are added by pairwise halving (`fixed_sum`). The result then depends on the values,
the torch build and the CPU's instruction set only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution, Normal, kl_divergence

from bnnify.bnn.kl_training import has_flat_log_prob, has_gaussian_closed_form, pair_has_closed_form
from bnnify.bnn.priors import Prior
from bnnify.errors import InvalidArgumentError

__all__ = [
    "REPORT_CHUNK",
    "distribution_report_kl",
    "fixed_sum",
    "gaussian_report_kl",
    "parameter_kl",
]

# Below torch's parallel grain size (32768 elements): kernels on a chunk run serially.
REPORT_CHUNK = 1 << 14
_TAIL = 256
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def fixed_sum(values: Tensor) -> float:
    """Sum of all elements in float64, in an order fixed by their number alone.

    Pairwise halving (each step adds two halves elementwise; an addition rounds the
    same in vector and scalar code) down to `_TAIL` partial sums, which `math.fsum`
    adds exactly. The result depends on the values only, not on threads or layout.

    Example:
        >>> fixed_sum(torch.tensor([1e16, 1.0, -1e16, 1.0]))
        2.0
    """
    flat = values.reshape(-1)
    size = max(1 << max(flat.numel() - 1, 0).bit_length(), _TAIL)
    buffer = torch.zeros(size, dtype=torch.float64, device=flat.device)
    buffer[: flat.numel()] = flat
    while size > _TAIL:
        size //= 2
        buffer.narrow(0, 0, size).add_(buffer.narrow(0, size, size))
    return math.fsum(buffer[:size].tolist())


def _fresh(t: Tensor) -> Tensor:
    # `empty` + `copy_`, not `.to`: a float64 input would come back as the same view.
    return torch.empty(t.shape, dtype=torch.float64, device=t.device).copy_(t)


def _uses_fused(prior: Prior, num_samples: int | None) -> bool:
    return has_gaussian_closed_form(prior) if num_samples is None else has_flat_log_prob(prior)


@torch.no_grad()
def gaussian_report_kl(
    mu: Tensor,
    rho: Tensor,
    prior: Prior,
    num_samples: int | None = None,
    progress: Callable[[int], Any] | None = None,
) -> Tensor:
    """KL(N(mu, softplus(rho)^2) || prior) of one parameter, for a report.

    Args:
        mu: The posterior means, in the parameter's shape (any strides).
        rho: The pre-softplus scales, like `mu`.
        prior: The parameter's prior.
        num_samples: None for the closed form, else Monte Carlo samples per element
            (their noise comes from a seed drawn from torch's global generator).
        progress: Called with the elements of each chunk once it is done.

    Returns:
        A 0-dim float64 tensor on `mu`'s device.

    Raises:
        ValueError: (`InvalidArgumentError`) If the pair has no closed form and
            `num_samples` is None.
    """
    if not _uses_fused(prior, num_samples):
        posterior = Normal(mu.double(), F.softplus(rho.double()))
        return _against(posterior, prior, num_samples, "GaussianPosterior")
    mu, rho = mu.reshape(-1), rho.reshape(-1)
    seed = 0 if num_samples is None else int(torch.randint(0, 2**40, (), device="cpu"))
    # Monte Carlo chunks hold num_samples rows: fewer columns keep them under the grain.
    size = REPORT_CHUNK if num_samples is None else max(REPORT_CHUNK // num_samples, 1)
    sums: list[float] = []
    for start in range(0, mu.numel(), size):
        end = min(start + size, mu.numel())
        m, sigma = _fresh(mu[start:end]), F.softplus(_fresh(rho[start:end]))
        index = slice(start, end)
        if num_samples is None:
            sums.append(fixed_sum(prior.gaussian_kl(m, sigma, index)))
        else:
            generator = torch.Generator(device=m.device).manual_seed(seed + start)
            sums.append(_monte_carlo_sum(m, sigma, prior, index, num_samples, generator))
        if progress is not None:
            progress(end - start)
    return torch.tensor(math.fsum(sums), dtype=torch.float64, device=mu.device)


def _monte_carlo_sum(
    mu: Tensor,
    sigma: Tensor,
    prior: Prior,
    index: slice,
    num_samples: int,
    generator: torch.Generator,
) -> float:
    """Mean over samples of the summed log q - log p over a chunk, in blocks of rows."""
    rows = max(REPORT_CHUNK // mu.numel(), 1)
    log_sigma = sigma.log()
    sums = []
    for first in range(0, num_samples, rows):
        shape = (min(rows, num_samples - first), mu.numel())
        eps = torch.randn(shape, generator=generator, dtype=mu.dtype, device=mu.device)
        log_q = -0.5 * eps.square() - log_sigma - _LOG_SQRT_2PI
        sums.append(fixed_sum(log_q - prior.flat_log_prob(mu + sigma * eps, index)))
    return math.fsum(sums) / num_samples


@torch.no_grad()
def distribution_report_kl(
    posterior: Distribution, prior: Distribution, num_samples: int | None
) -> Tensor:
    """KL(posterior || prior) summed in a fixed order (0-dim float64), closed form or MC.

    The elementwise terms are torch.distributions' own, computed at the current
    thread count: for thread-independent values, give the prior `gaussian_kl` and
    `flat_log_prob`.

    Raises:
        NotImplementedError: If `num_samples` is None and torch has no closed form
            registered for the pair.
    """
    if num_samples is None:
        terms, count = kl_divergence(posterior, prior), 1
    else:
        w = posterior.sample((num_samples,))
        terms, count = posterior.log_prob(w) - prior.log_prob(w), num_samples
    return torch.tensor(fixed_sum(terms) / count, dtype=torch.float64, device=terms.device)


def _against(posterior: Distribution, prior: Prior, num_samples: int | None, name: str) -> Tensor:
    p = prior.distribution
    if num_samples is None and not pair_has_closed_form(posterior, p):
        raise InvalidArgumentError(
            f"no closed-form KL divergence is known for {name} vs {type(prior).__name__}",
            hint="Pass approx_num_samples=N (e.g. 16) for a Monte Carlo estimate.",
        )
    return distribution_report_kl(posterior, p, num_samples)


def parameter_kl(
    posterior: Any,
    prior: Prior,
    num_samples: int | None,
    progress: Callable[[int], Any] | None = None,
) -> Tensor:
    """KL(posterior || prior) of one parameter for a report (0-dim float64, no gradient).

    The one function behind every reported KL (`bnnify convert`, `bnnify kl`,
    `BayesianModule.kl_by_parameter`), so that they agree exactly. `progress` is called
    with a count of elements as they are done (chunk by chunk where the KL is chunked),
    so that a bar moves within a large tensor or a long Monte Carlo estimate.

    Raises:
        ValueError: (`InvalidArgumentError`) If no closed form is known for the pair
            and `num_samples` is None.
    """
    from bnnify.bnn.posteriors import is_flat

    if is_flat(type(posterior)):
        return gaussian_report_kl(posterior.mu, posterior.rho, prior, num_samples, progress)
    with torch.no_grad():
        value = _against(posterior.distribution, prior, num_samples, type(posterior).__name__)
    if progress is not None:
        progress(posterior.distribution.batch_shape.numel())
    return value
