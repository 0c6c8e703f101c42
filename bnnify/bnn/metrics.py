"""Predictive summaries and metrics from Monte Carlo samples of a Bayesian network."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "classification_summary",
    "expected_calibration_error",
    "gaussian_mixture_log_likelihood",
    "regression_summary",
]


def regression_summary(samples: Tensor, noise: float | Tensor) -> dict[str, Tensor]:
    """Predictive mean and standard deviations from samples `(S, batch, ...)`.

    The predictive distribution is the mixture of N(f_s(x), noise^2) over samples:
    its variance is the variance of the sample means (epistemic) plus noise^2
    (aleatoric).
    """
    mean = samples.mean(0)
    epistemic = samples.var(0, unbiased=False).sqrt()
    aleatoric = torch.as_tensor(noise, dtype=samples.dtype).expand_as(mean)
    std = (epistemic.square() + aleatoric.square()).sqrt()
    return {"mean": mean, "std": std, "epistemic_std": epistemic, "aleatoric_std": aleatoric}


def gaussian_mixture_log_likelihood(samples: Tensor, noise: float | Tensor, y: Tensor) -> Tensor:
    """Per-example log p(y | x) of the mixture (1/S) sum_s N(y; f_s(x), noise^2).

    Multi-output targets sum their per-dimension log densities.
    """
    s = samples.shape[0]
    f = samples.reshape(s, samples.shape[1], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    noise = torch.as_tensor(noise, dtype=torch.float64)
    log_p = (-0.5 * ((y - f) / noise).square() - noise.log() - 0.5 * math.log(2 * math.pi)).sum(2)
    return torch.logsumexp(log_p, 0) - math.log(s)


def classification_summary(logit_samples: Tensor) -> dict[str, Tensor]:
    """Mean probabilities, predicted class and the entropy decomposition, per example.

    predictive entropy H[E p] = expected entropy E H[p] (aleatoric) + mutual
    information (epistemic, the disagreement between weight samples).
    """
    probs = logit_samples.double().softmax(-1)
    mean = probs.mean(0)
    log_probs = logit_samples.double().log_softmax(-1)
    predictive = -(mean * mean.clamp_min(1e-300).log()).sum(-1)
    expected = -(probs * log_probs).sum(-1).mean(0)
    return {
        "probs": mean,
        "predicted": mean.argmax(-1),
        "predictive_entropy": predictive,
        "expected_entropy": expected,
        "mutual_information": (predictive - expected).clamp_min(0.0),
    }


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """Expected calibration error with `bins` equal-width confidence bins.

    ECE = sum_b (n_b / n) |accuracy_b - confidence_b|, confidence being the top
    probability.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7]])
        >>> round(expected_calibration_error(probs, torch.tensor([0, 1, 1]), bins=5), 4)
        0.3167
    """
    confidence, predicted = probs.double().max(-1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    n = probs.shape[0]
    for i in range(bins):
        low, high = edges[i], edges[i + 1]
        inside = (confidence > low) & (confidence <= high) if i else (confidence <= high)
        count = int(inside.sum())
        if count:
            gap = correct[inside].mean() - confidence[inside].double().mean()
            ece += count / n * float(gap.abs())
    return ece
