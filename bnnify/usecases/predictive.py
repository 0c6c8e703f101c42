"""The predictive of a runner on inputs: its samples, their summary and their metrics.

`predict` reports them and `calibrate` fits on them: one way to draw and to score.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bnnify.bnn.likelihood import classes_last
from bnnify.bnn.metrics import (
    classification_scores,
    classification_summary,
    regression_metrics,
    regression_scores,
    regression_summary,
)
from bnnify.enums import Task
from bnnify.formats.model_inputs import Inputs
from bnnify.usecases.runner import Runner

__all__ = [
    "BAYESIAN",
    "MEAN_WEIGHTS",
    "draw_predictions",
    "noise_of",
    "scores",
    "summarise",
]

# The models predict reports: the Bayesian predictive, and the posterior means' network.
BAYESIAN, MEAN_WEIGHTS = "bayesian", "mean_weights"


def draw_predictions(
    runner: Runner,
    x: Inputs,
    task: Task,
    samples: int,
    batch_size: int,
    mean: bool = False,
    class_dim: int = -1,
) -> Tensor:
    """Outputs `(S, examples, ...)` of `samples` weight samples (`mean`: one, the means).

    Classification logits have their classes moved last.
    """
    draws = runner.predict_batches(x, samples, batch_size, mean=mean)
    if task is Task.CLASSIFICATION:
        draws = classes_last(draws, class_dim, leading=1)
    return draws


def scores(task: Task, draws: Tensor, y: Tensor, noise: float = 0.0) -> dict[str, float]:
    """The metrics `predict` reports for outputs `(S, examples, ...)` against `y`.

    Regression: `regression_scores` of the mixture with noise scale `noise` (without a
    noise scale the predictive has no density: `rmse` only); classification:
    `classification_scores` of the mean probabilities. Both add `log_likelihood`,
    minus the `nll`.
    """
    if task is Task.REGRESSION:
        if noise <= 0:
            return regression_metrics(draws, y, 0.0)  # rmse alone
        metrics = regression_scores(draws, noise, y)
    else:
        metrics = classification_scores(classification_summary(draws)["probs"], y)
    metrics["log_likelihood"] = -metrics["nll"]
    return metrics


def summarise(
    task: Task, draws: Tensor, noise: float, keep_samples: bool
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors of the predictions file, and the mean uncertainties of the summary."""
    if task is Task.REGRESSION:
        tensors = regression_summary(draws, noise)
        summary = {
            "mean_std": float(tensors["std"].mean()),
            "mean_epistemic_std": float(tensors["epistemic_std"].mean()),
            "aleatoric_std": noise,
        }
    else:
        tensors = classification_summary(draws)
        predicted = tensors["predicted"].reshape(-1)
        summary = {
            "mean_predictive_entropy": float(tensors["predictive_entropy"].mean()),
            "mean_mutual_information": float(tensors["mutual_information"].mean()),
            "positions": predicted.numel(),
            "class_counts": torch.bincount(predicted, minlength=draws.shape[-1]).tolist(),
        }
    if keep_samples:
        tensors["samples"] = draws
    return {k: v.contiguous() for k, v in tensors.items()}, summary


def noise_of(fit_tensors: dict[str, Tensor]) -> float | None:
    """The fitted regression noise scale of a checkpoint, if any."""
    log_noise = fit_tensors.get("bnnify.fit.log_noise")
    return None if log_noise is None else math.exp(float(log_noise))
