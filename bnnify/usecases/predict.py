"""Predictions of a Bayesian model with their uncertainty, and metrics against targets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bnnify.bnn.likelihood import CategoricalLikelihood, GaussianLikelihood
from bnnify.bnn.metrics import (
    classification_summary,
    expected_calibration_error,
    gaussian_mixture_log_likelihood,
    regression_summary,
)
from bnnify.formats.data import Dataset
from bnnify.usecases.runner import Runner

__all__ = ["Prediction", "predict"]


@dataclass
class Prediction:
    """Output tensors (for the safetensors file), a summary and metrics (for stdout)."""

    tensors: dict[str, Tensor]
    summary: dict[str, Any]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


@torch.no_grad()
def _draws(runner: Runner, x: Tensor, samples: int, batch_size: int, mean: bool) -> Tensor:
    device = runner.bnn._kl_meta.device
    parts = []
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start : start + batch_size].to(device)
        if mean:
            parts.append(runner.mean_forward(chunk).unsqueeze(0).cpu())
        else:
            parts.append(runner.predict_samples(chunk, samples).cpu())
    return torch.cat(parts, 1)


def predict(
    runner: Runner,
    data: Dataset,
    *,
    task: str,
    samples: int = 32,
    batch_size: int = 256,
    noise: float | None = None,
    keep_samples: bool = False,
    mean_weights: bool = False,
) -> Prediction:
    """Predicts `data.x` with `samples` weight samples (or the posterior means).

    Regression: predictive mean and standard deviation, split into epistemic (spread
    of the sampled networks) and aleatoric (the fitted noise `noise`). Classification:
    mean probabilities, predicted class, predictive entropy, expected entropy and
    mutual information. With targets in `data`, metrics of the Bayesian model and of
    the mean-weights model side by side.
    """
    noise = 0.0 if noise is None else noise
    draws = _draws(runner, data.x, samples, batch_size, mean_weights)
    mean_draw = draws if mean_weights else _draws(runner, data.x, 1, batch_size, True)
    if task == "regression":
        tensors = regression_summary(draws, noise)
        summary = {
            "mean_std": float(tensors["std"].mean()),
            "mean_epistemic_std": float(tensors["epistemic_std"].mean()),
            "aleatoric_std": noise,
        }
    else:
        tensors = classification_summary(draws)
        summary = {
            "mean_predictive_entropy": float(tensors["predictive_entropy"].mean()),
            "mean_mutual_information": float(tensors["mutual_information"].mean()),
            "class_counts": torch.bincount(tensors["predicted"]).tolist(),
        }
    if keep_samples:
        tensors["samples"] = draws
    summary.update(
        {
            "examples": int(data.x.shape[0]),
            "task": task,
            "samples": 1 if mean_weights else samples,
            "mean_weights": mean_weights,
        }
    )
    result = Prediction({k: v.contiguous() for k, v in tensors.items()}, summary)
    if data.y is not None:
        # Labels out of range or targets of another width would fail in indexing or
        # broadcast silently: refuse them with the likelihood's own message.
        likelihood = GaussianLikelihood() if task == "regression" else CategoricalLikelihood()
        likelihood.check(draws[0], data.y)
        result.metrics = _metrics(task, draws, mean_draw, data.y, noise, mean_weights)
    return result


def _metrics(
    task: str, draws: Tensor, mean_draw: Tensor, y: Tensor, noise: float, mean_weights: bool
) -> dict[str, dict[str, float]]:
    models = (
        {"mean_weights": mean_draw}
        if mean_weights
        else {"bayesian": draws, "mean_weights": mean_draw}
    )
    return {
        name: (_regression(d, y, noise) if task == "regression" else _classification(d, y))
        for name, d in models.items()
    }


def _regression(draws: Tensor, y: Tensor, noise: float) -> dict[str, float]:
    mean = draws.mean(0).reshape(y.shape[0], -1).double()
    target = y.reshape(y.shape[0], -1).double()
    out = {"rmse": float((mean - target).square().mean().sqrt())}
    if noise > 0:
        out["log_likelihood"] = float(gaussian_mixture_log_likelihood(draws, noise, y).mean())
    return out


def _classification(draws: Tensor, y: Tensor) -> dict[str, float]:
    summary = classification_summary(draws)
    labels = y.long().reshape(-1)
    probs = summary["probs"]
    picked = probs[torch.arange(labels.shape[0]), labels]
    return {
        "accuracy": float((summary["predicted"] == labels).double().mean()),
        "log_likelihood": float(picked.clamp_min(1e-300).log().mean()),
        "ece": expected_calibration_error(probs, labels),
        "nll": float(-picked.clamp_min(1e-300).log().mean()),
    }


def noise_of(fit_tensors: dict[str, Tensor]) -> float | None:
    """The fitted regression noise scale of a checkpoint, if any."""
    log_noise = fit_tensors.get("bnnify.fit.log_noise")
    return None if log_noise is None else math.exp(float(log_noise))
