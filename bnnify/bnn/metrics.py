"""Predictive summaries and metrics from Monte Carlo samples of a Bayesian network.

`fit` (validation) and `predict` (test metrics) both report these, through
`regression_metrics` and `classification_metrics`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "classification_metrics",
    "classification_summary",
    "expected_calibration_error",
    "gaussian_mixture_log_likelihood",
    "regression_metrics",
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


def regression_metrics(samples: Tensor, y: Tensor, noise: float) -> dict[str, float]:
    """RMSE of the predictive mean and, when `noise > 0`, the mean test log-likelihood.

    Args:
        samples: Outputs `(S, batch, ...)` of S weight samples.
        y: Targets, one row per example.
        noise: The Gaussian noise scale of the likelihood (0: the log-likelihood is
            undefined and left out).
    """
    mean = samples.mean(0).reshape(y.shape[0], -1).double()
    target = y.reshape(y.shape[0], -1).double()
    metrics = {"rmse": float((mean - target).square().mean().sqrt())}
    if noise > 0:
        log_likelihood = gaussian_mixture_log_likelihood(samples, noise, y)
        metrics["log_likelihood"] = float(log_likelihood.mean())
    return metrics


def classification_metrics(logit_samples: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy, mean test log-likelihood and expected calibration error of the mean probabilities.

    Example:
        >>> logits = torch.tensor([[[4.0, 0.0], [0.0, 4.0]]])
        >>> metrics = classification_metrics(logits, torch.tensor([0, 0]))
        >>> metrics["accuracy"], round(metrics["log_likelihood"], 3)
        (0.5, -2.018)
    """
    summary = classification_summary(logit_samples)
    labels = labels.long().reshape(-1)
    probs = summary["probs"]
    picked = probs[torch.arange(labels.shape[0]), labels]
    return {
        "accuracy": float((summary["predicted"] == labels).double().mean()),
        "log_likelihood": float(picked.clamp_min(1e-300).log().mean()),
        "ece": expected_calibration_error(probs, labels),
    }
