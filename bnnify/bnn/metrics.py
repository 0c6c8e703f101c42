"""Predictive summaries and metrics from Monte Carlo samples of a Bayesian network.

Each metric is computed in one place: `regression_scores` and `classification_scores`
report them all; `regression_metrics` and `classification_metrics`, the few that `fit`
(validation) and `predict` (test metrics) print, select from the same functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from bnnify.bnn.likelihood import class_labels, classes_last
from bnnify.bnn.mixture import (
    gaussian_mixture_cdf,
    gaussian_mixture_crps,
    gaussian_mixture_quantile,
)
from bnnify.errors import InvalidArgumentError

__all__ = [
    "CALIBRATION_LEVELS",
    "COVERAGE_LEVELS",
    "ECE_BINS",
    "OOD_SCORES",
    "auroc",
    "average_precision",
    "classification_metrics",
    "classification_scores",
    "classification_summary",
    "expected_calibration_error",
    "gaussian_mixture_log_likelihood",
    "interval_coverage",
    "ood_detection",
    "quantile_calibration_error",
    "quantile_coverage",
    "regression_metrics",
    "regression_scores",
    "regression_summary",
    "reliability_bins",
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
    # A scale per component or per example (a calibrated std) is laid out as the samples.
    noise = torch.as_tensor(noise, dtype=torch.float64).expand(samples.shape).reshape(f.shape)
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
    probability, over the bins of `reliability_bins`.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7]])
        >>> round(expected_calibration_error(probs, torch.tensor([0, 1, 1]), bins=5), 4)
        0.3167
    """
    table = reliability_bins(probs, labels, bins)
    weights = table["counts"].double() / table["counts"].sum()
    return float((weights * (table["accuracy"] - table["confidence"]).abs()).sum())


# ------------------------------------------------------------------ regression

COVERAGE_LEVELS = (0.5, 0.9, 0.95)
CALIBRATION_LEVELS = tuple(round(0.05 * j, 2) for j in range(1, 20))
ECE_BINS = 15
OOD_SCORES = ("predictive_entropy", "mutual_information", "max_softmax")


def interval_coverage(pit: Tensor, levels: Sequence[float] = COVERAGE_LEVELS) -> Tensor:
    """Fraction of targets inside the central predictive interval of each level c.

    Computed from `pit = gaussian_mixture_cdf(...)`: y is in [q_(1-c)/2, q_(1+c)/2] iff
    |F(y) - 1/2| <= c/2, F being continuous and increasing.
    """
    half = torch.as_tensor(levels, dtype=torch.float64) / 2
    return ((pit.double().reshape(-1, 1) - 0.5).abs() <= half).double().mean(0)


def quantile_coverage(pit: Tensor, levels: Sequence[float] = CALIBRATION_LEVELS) -> Tensor:
    """Fraction of targets at or below the predictive quantile q_p of each level p."""
    p = torch.as_tensor(levels, dtype=torch.float64)
    return (pit.double().reshape(-1, 1) <= p).double().mean(0)


def quantile_calibration_error(pit: Tensor, levels: Sequence[float] = CALIBRATION_LEVELS) -> float:
    """Mean over levels p of |P(y <= q_p) - p|, by default p = 0.05, 0.10, ..., 0.95.

    Zero for a calibrated predictive (up to sampling noise), up to 0.5. One-sided levels
    catch a bias that central intervals miss (targets all below the median, at the right
    distances, cover every central interval as they should).
    """
    p = torch.as_tensor(levels, dtype=torch.float64)
    return float((quantile_coverage(pit, levels) - p).abs().mean())


def regression_scores(samples: Tensor, noise: float | Tensor, y: Tensor) -> dict[str, float]:
    """The regression metrics of the predictive (1/S) sum_s N(f_s(x), noise^2) against `y`.

    `rmse` and `mae` of the predictive mean; `nll`, the mean negative log density of the
    mixture per example (outputs summed); per scalar output, averaged: `crps`, coverage
    and mean width of the central 50/90/95% intervals (`coverage_90`, `width_90`, ...)
    and `calibration_error` (`quantile_calibration_error` over p = 0.05, ..., 0.95).

    Args:
        samples: Outputs `(S, batch, ...)`; a single Gaussian is `mean[None]`, `std[None]`.
        noise: Positive scale(s) broadcastable to `samples`.
        y: Targets, one row per example.

    Raises:
        InputError: The targets do not match the predictions.
        InvalidArgumentError: A noise scale is not positive or does not broadcast.
    """
    pit = gaussian_mixture_cdf(samples, noise, y)  # checks the shapes and scales
    scores = {
        **_point_scores(samples, y),
        "nll": _nll(samples, noise, y),
        "crps": float(gaussian_mixture_crps(samples, noise, y).mean()),
        "calibration_error": quantile_calibration_error(pit),
    }
    lower = [(1 - c) / 2 for c in COVERAGE_LEVELS]
    bounds = gaussian_mixture_quantile(samples, noise, lower + [1 - p for p in lower])
    widths = (bounds[len(lower) :] - bounds[: len(lower)]).reshape(len(lower), -1).mean(1)
    coverage = interval_coverage(pit, COVERAGE_LEVELS)
    for c, covered, width in zip(COVERAGE_LEVELS, coverage, widths, strict=True):
        scores[f"coverage_{round(100 * c)}"] = float(covered)
        scores[f"width_{round(100 * c)}"] = float(width)
    return scores


def regression_metrics(samples: Tensor, y: Tensor, noise: float) -> dict[str, float]:
    """`rmse` and, when `noise > 0`, `log_likelihood` (= -`nll`) of `regression_scores`.

    What `fit` (validation) and `predict` print, without the quantiles and CRPS that
    make `regression_scores` far slower.

    Args:
        samples: Outputs `(S, batch, ...)` of S weight samples.
        y: Targets, one row per example.
        noise: The Gaussian noise scale of the likelihood (0: the log-likelihood is
            undefined and left out).
    """
    metrics = {"rmse": _point_scores(samples, y)["rmse"]}
    if noise > 0:
        metrics["log_likelihood"] = -_nll(samples, noise, y)
    return metrics


def _point_scores(samples: Tensor, y: Tensor) -> dict[str, float]:
    error = samples.double().mean(0).reshape(-1) - y.double().reshape(-1)
    return {"rmse": float(error.square().mean().sqrt()), "mae": float(error.abs().mean())}


def _nll(samples: Tensor, noise: float | Tensor, y: Tensor) -> float:
    return -float(gaussian_mixture_log_likelihood(samples, noise, y).mean())


# -------------------------------------------------------------- classification


def _flat_classes(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Probabilities `(M, C)` in float64 and labels `(M,)` from `(..., C)` and `(...)`.

    The labels' shape and values are checked by `class_labels`, the likelihood's rule.
    """
    labels = class_labels(classes_last(probs), labels)
    return probs.double().reshape(-1, probs.shape[-1]), labels.long().reshape(-1)


def reliability_bins(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> dict[str, Tensor]:
    """Per equal-width confidence bin: count, accuracy and mean confidence (top probability).

    Bin b holds confidences in (b/bins, (b+1)/bins], the first one also 0. Empty bins
    have accuracy and confidence 0.

    Args:
        probs: Predictive probabilities `(..., C)`.
        labels: Class indices of the leading shape of `probs`, or that shape plus a 1.
        bins: The number of bins.

    Returns:
        `edges` `(bins + 1,)`, and `counts`, `accuracy`, `confidence` `(bins,)`.
    """
    probs, labels = _flat_classes(probs, labels)
    confidence, predicted = probs.max(-1)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence, edges[1:-1]).clamp_max(bins - 1)
    counts = torch.bincount(index, minlength=bins)
    zeros = torch.zeros(bins, dtype=torch.float64)
    correct = (predicted == labels).double()
    return {
        "edges": edges,
        "counts": counts,
        "accuracy": zeros.index_add(0, index, correct) / counts.clamp_min(1),
        "confidence": zeros.index_add(0, index, confidence) / counts.clamp_min(1),
    }


def classification_scores(
    probs: Tensor, labels: Tensor, bins: int = ECE_BINS
) -> dict[str, float | int]:
    """Accuracy, `nll` (mean -log p(label)), Brier score and ECE of predictive probabilities.

    Brier = mean over examples of sum_c (p_c - [label = c])^2, in [0, 2]. ECE as in
    `expected_calibration_error`, with `ece_bins` bins.

    Args:
        probs: Predictive probabilities `(..., C)`, e.g. `classification_summary`'s `probs`.
        labels: Class indices of the leading shape of `probs`, or that shape plus a 1.
        bins: Bins of the ECE.

    Raises:
        InputError: The labels do not match the predictions or are not class indices.

    Example:
        >>> probs = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
        >>> scores = classification_scores(probs, torch.tensor([[0], [0]]))
        >>> scores["accuracy"], round(scores["brier"], 2)
        (0.5, 0.4)
    """
    flat, target = _flat_classes(probs, labels)
    rows = torch.arange(target.shape[0])
    one_hot = torch.zeros_like(flat).index_put_((rows, target), torch.tensor(1.0).double())
    return {
        "accuracy": float((flat.argmax(-1) == target).double().mean()),
        "nll": -float(flat[rows, target].clamp_min(1e-300).log().mean()),
        "brier": float((flat - one_hot).square().sum(-1).mean()),
        "ece": expected_calibration_error(flat, target, bins),
        "ece_bins": bins,
    }


def classification_metrics(logit_samples: Tensor, labels: Tensor) -> dict[str, float]:
    """`accuracy`, `log_likelihood` (= -`nll`) and `ece` of `classification_scores`.

    The scores of the mean probabilities over the logit samples `(S, ..., C)`: what `fit`
    (validation) and `predict` print.

    Example:
        >>> logits = torch.tensor([[[4.0, 0.0], [0.0, 4.0]]])
        >>> metrics = classification_metrics(logits, torch.tensor([0, 0]))
        >>> metrics["accuracy"], round(metrics["log_likelihood"], 3)
        (0.5, -2.018)
    """
    scores = classification_scores(classification_summary(logit_samples)["probs"], labels)
    return {
        "accuracy": scores["accuracy"],
        "log_likelihood": -scores["nll"],
        "ece": scores["ece"],
    }


def _detection(scores: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    scores, positive = scores.double().reshape(-1), positive.bool().reshape(-1)
    if scores.shape != positive.shape or not torch.isfinite(scores).all():
        raise InvalidArgumentError("detection needs one finite score per example and label")
    if positive.all() or not positive.any():
        raise InvalidArgumentError("detection needs examples of both classes")
    return scores, positive


def auroc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties half.

    Computed from average ranks (Mann-Whitney U), O(n log n).

    Example:
        >>> auroc(torch.tensor([0.1, 0.4, 0.4, 0.9]), torch.tensor([0, 0, 1, 1]))
        0.875
    """
    scores, positive = _detection(scores, positive)
    order = scores.argsort()
    _, counts = torch.unique_consecutive(scores[order], return_counts=True)
    average = (counts.cumsum(0) - (counts - 1) / 2).double().repeat_interleave(counts)
    ranks = torch.empty_like(scores).index_put_((order,), average)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores: Tensor, positive: Tensor) -> float:
    """Area under the precision-recall curve as average precision, tied scores one threshold.

    AP = sum_t (recall_t - recall_t-1) precision_t over thresholds t, the distinct
    scores from the highest; a positive example scores higher.

    Example:
        >>> average_precision(torch.tensor([0.9, 0.8, 0.4, 0.1]), torch.tensor([1, 0, 1, 0]))
        0.8333333333333333
    """
    scores, positive = _detection(scores, positive)
    order = scores.argsort(descending=True)
    _, counts = torch.unique_consecutive(scores[order], return_counts=True)
    true_positives = positive[order].double().cumsum(0)[counts.cumsum(0) - 1]
    precision = true_positives / counts.cumsum(0)
    recall_steps = torch.diff(true_positives, prepend=true_positives.new_zeros(1))
    return float((recall_steps * precision).sum() / true_positives[-1])


def ood_detection(logits_in: Tensor, logits_out: Tensor) -> dict[str, dict[str, float]]:
    """AUROC and AUPR of each score of `OOD_SCORES` at telling OOD inputs from others.

    Out-of-distribution inputs are the positive class; predictive entropy and mutual
    information score higher on them, and max softmax enters negated (lower confidence).
    With one sample (a deterministic network) mutual information is zero up to rounding,
    which would rank inputs by noise: it is left out.

    Args:
        logits_in: Logit samples `(S, ..., C)` of in-distribution inputs.
        logits_out: Logit samples `(S, ..., C)` of out-of-distribution inputs.
    """
    inside, outside = classification_summary(logits_in), classification_summary(logits_out)
    positive = torch.cat(
        [torch.zeros(inside["probs"][..., 0].numel()), torch.ones(outside["probs"][..., 0].numel())]
    ).bool()
    results = {}
    for name in OOD_SCORES:
        if name == "mutual_information" and min(len(logits_in), len(logits_out)) == 1:
            continue
        score = torch.cat([_ood_score(inside, name), _ood_score(outside, name)])
        results[name] = {
            "auroc": auroc(score, positive),
            "aupr": average_precision(score, positive),
        }
    return results


def _ood_score(summary: dict[str, Tensor], name: str) -> Tensor:
    if name == "max_softmax":
        # -max p ranks as 1 - max p, the sum of the other probabilities: summed, they keep
        # the digits that 1 - p loses when p rounds to 1 (confident inputs would all tie).
        probs = summary["probs"].flatten(0, -2).sort(-1).values
        return probs[:, :-1].sum(-1)
    return summary[name].reshape(-1)
