"""Post-hoc calibration of the predictive: a temperature on logits, a scale of the spread.

Both are one positive number fitted on held-out data by minimising the negative
log-likelihood of the Monte Carlo predictive over its logarithm, in bounds: a grid (which
holds 1, so that the fit never does worse than no calibration on those data), then a
golden-section search around the best grid point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from bnnify.bnn.likelihood import class_labels
from bnnify.bnn.metrics import gaussian_mixture_log_likelihood
from bnnify.errors import InputError, InvalidArgumentError

__all__ = [
    "BOUNDS",
    "ScaleFit",
    "apply_calibration",
    "categorical_nll",
    "fit_spread_scale",
    "fit_temperature",
    "minimise_log",
    "scale_spread",
    "temper",
]

# Both parameters are searched in [1/100, 100]: beyond, the model is no use as it is.
BOUNDS = (1e-2, 1e2)
_GRID = 21  # log-spaced points, a factor 1.58 apart
_TOLERANCE = 1e-5  # of log(value): where the golden-section search stops
_CHUNK = 1 << 22  # elements of the largest temporary of one evaluation


@dataclass(frozen=True)
class ScaleFit:
    """A fitted calibration parameter and the validation NLL before (at 1) and after.

    `at_bound` says the optimum lies at an end of `BOUNDS`: the data ask for more
    than a calibration should give (labels unrelated to the outputs, or separable).
    """

    value: float
    nll_before: float
    nll_after: float
    at_bound: bool


def temper(logit_samples: Tensor, temperature: float) -> Tensor:
    """Logits divided by the temperature, each weight sample's before its softmax."""
    return logit_samples / temperature


def scale_spread(samples: Tensor, noise: float, scale: float) -> tuple[Tensor, float]:
    """The regression predictive scaled by `scale` around its mean: samples and noise.

    f_s -> mean + scale (f_s - mean) and noise -> scale * noise, so the mixture's mean
    is kept and its variance (epistemic and aleatoric parts alike) multiplied by scale^2.

    Example:
        >>> samples, noise = scale_spread(torch.tensor([[1.0], [3.0]]), 0.5, 2.0)
        >>> samples.flatten().tolist(), noise
        ([0.0, 4.0], 1.0)
    """
    mean = samples.mean(0, keepdim=True)
    return mean + scale * (samples - mean), noise * scale


def categorical_nll(logit_samples: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    """Mean over positions of -log (1/S) sum_s softmax(z_s / T)[label].

    That is `classification_scores`' `nll` of the tempered predictive, computed in
    log space and in chunks of positions.

    Args:
        logit_samples: Logits `(S, ..., C)`, classes last.
        labels: Class indices of shape `(...)`.
        temperature: T > 0.
    """
    s, classes = logit_samples.shape[0], logit_samples.shape[-1]
    labels = class_labels(logit_samples[0], labels).reshape(-1).long()
    logits = logit_samples.reshape(s, -1, classes)
    step = max(1, _CHUNK // (s * classes))
    total = 0.0
    for i in range(0, labels.numel(), step):
        z = logits[:, i : i + step].double() / temperature
        index = labels[i : i + step].expand(s, -1).unsqueeze(-1)
        log_p = z.log_softmax(-1).gather(-1, index).squeeze(-1)
        total -= float((torch.logsumexp(log_p, 0) - math.log(s)).sum())
    return total / labels.numel()


def fit_temperature(
    logit_samples: Tensor, labels: Tensor, bounds: tuple[float, float] = BOUNDS
) -> ScaleFit:
    """The temperature T minimising `categorical_nll` on held-out labels.

    Args:
        logit_samples: Logits `(S, ..., C)` of S weight samples, classes last.
        labels: Class indices of the leading shape.
        bounds: The interval searched.

    Raises:
        InputError: The labels do not fit the logits.

    Example:
        >>> logits = torch.tensor([[[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 0.0]]])
        >>> fit = fit_temperature(logits, torch.tensor([0, 1, 1, 0]))
        >>> fit.value > 1 and fit.nll_after < fit.nll_before
        True
    """
    class_labels(logit_samples[0], labels)  # shapes and values, once
    return _fit(lambda t: categorical_nll(logit_samples, labels, t), bounds)


def fit_spread_scale(
    samples: Tensor, noise: float, y: Tensor, bounds: tuple[float, float] = BOUNDS
) -> ScaleFit:
    """The scale s of `scale_spread` maximising the mixture's log-likelihood of `y`.

    Args:
        samples: Outputs `(S, batch, ...)` of S weight samples.
        noise: The Gaussian noise scale (> 0).
        y: Targets, one row per example.
        bounds: The interval searched.

    Raises:
        InvalidArgumentError: The noise scale is not positive.
        InputError: The targets do not fit the outputs.
    """
    if not (math.isfinite(noise) and noise > 0):
        raise InvalidArgumentError(
            f"calibrating a regression predictive needs a positive noise scale, got {noise}",
            hint="Fit the checkpoint first (`bnnify fit`): it learns the noise scale.",
        )
    if y.shape[0] != samples.shape[1] or y.numel() != samples[0].numel():
        raise InputError(
            f"targets of shape {tuple(y.shape)} do not match predictions of shape "
            f"{tuple(samples.shape[1:])}",
            hint="Give one row per example and one target per model output.",
        )
    mean = samples.double().mean(0, keepdim=True)
    spread = samples.double() - mean

    def nll(scale: float) -> float:
        log_p = gaussian_mixture_log_likelihood(mean + scale * spread, noise * scale, y)
        return -float(log_p.mean())

    return _fit(nll, bounds)


def _fit(objective: Callable[[float], float], bounds: tuple[float, float]) -> ScaleFit:
    before = objective(1.0)
    value, after = minimise_log(objective, bounds)
    if after > before:  # 1 is on the grid: only an exact tie could leave it
        value, after = 1.0, before
    low, high = bounds
    at_bound = math.isclose(value, low, rel_tol=1e-3) or math.isclose(value, high, rel_tol=1e-3)
    return ScaleFit(value, before, after, at_bound)


def minimise_log(
    objective: Callable[[float], float], bounds: tuple[float, float] = BOUNDS
) -> tuple[float, float]:
    """Minimises `objective(v)` over v in `bounds`, searching log v: `(v, objective(v))`.

    A grid of log-spaced points holding 1 locates the best region (a multi-modal
    objective cannot trap the search in a worse valley than the grid sees), then a
    golden-section search refines it between the grid neighbours of the best point.
    The result is never worse than any point evaluated.

    Example:
        >>> value, best = minimise_log(lambda v: (math.log(v) - 1.0) ** 2)
        >>> round(value, 5), best < 1e-12
        (2.71828, True)
    """
    low, high = bounds
    if not (0 < low < 1 < high and math.isfinite(high)):
        raise InvalidArgumentError(f"bounds must satisfy 0 < low < 1 < high, got {bounds}")
    grid = sorted({0.0, *torch.linspace(math.log(low), math.log(high), _GRID).tolist()})
    values = [objective(math.exp(g)) for g in grid]
    best = min(range(len(grid)), key=values.__getitem__)
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    point, value = _golden(lambda g: objective(math.exp(g)), a, b)
    if value < values[best]:
        return math.exp(point), value
    return math.exp(grid[best]), values[best]


def _golden(f: Callable[[float], float], a: float, b: float) -> tuple[float, float]:
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    while b - a > _TOLERANCE:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (c, fc) if fc <= fd else (d, fd)


def apply_calibration(
    draws: Tensor, noise: float, value: float, *, classification: bool
) -> tuple[Tensor, float]:
    """Samples (and noise) of the calibrated predictive: `temper` or `scale_spread`."""
    if classification:
        return temper(draws, value), noise
    return scale_spread(draws, noise, value)
