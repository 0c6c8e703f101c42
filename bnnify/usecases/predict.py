"""`predict`: predictions with their uncertainty from a checkpoint, and metrics against targets."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bnnify.bnn.likelihood import CategoricalLikelihood, GaussianLikelihood, classes_last
from bnnify.bnn.metrics import (
    classification_metrics,
    classification_summary,
    regression_metrics,
    regression_summary,
)
from bnnify.enums import Task
from bnnify.errors import InvalidArgumentError
from bnnify.formats.atomic import AtomicOutputs
from bnnify.formats.data import Dataset
from bnnify.formats.predictions import (
    STDOUT,
    Predictions,
    check_destination,
    write_csv,
    write_predictions,
)
from bnnify.formats.spec import resolve_device
from bnnify.usecases import LOGGER_NAME
from bnnify.usecases.model_call import model_arguments
from bnnify.usecases.runner import Runner, check_input, open_runner
from bnnify.usecases.sources import (
    CheckpointLike,
    DataLike,
    ModelLike,
    as_checkpoint,
    as_dataset,
    file_paths,
    opened_model,
)

__all__ = ["PredictionResult", "noise_of", "predict", "predict_dataset"]

logger = logging.getLogger(LOGGER_NAME)


@dataclass
class PredictionResult:
    """Predictive tensors, their summary and metrics (what `bnnify predict` prints).

    Attributes:
        tensors: The tensors of the predictions file (see `formats.predictions`).
        summary: Examples, task, samples, the estimator (`{"estimator": ...,
            "reason": ...}`) and mean uncertainties; classification: the class
            counts over every position.
        metrics: With targets, the metrics of the Bayesian model and of the
            mean-weights model (`{"bayesian": {...}, "mean_weights": {...}}`).
        output: Where the predictions were written, if they were.
    """

    tensors: dict[str, Tensor]
    summary: dict[str, Any]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    output: Path | str | None = None

    def to_json(self) -> dict[str, Any]:
        """The result as `bnnify predict --json` prints it."""
        output = None if self.output is None else str(self.output)
        return {"summary": self.summary, "metrics": self.metrics, "output": output}


def predict(
    checkpoint: CheckpointLike,
    model: ModelLike,
    inputs: DataLike,
    *,
    samples: int = 32,
    targets: str | Path | Tensor | None = None,
    task: Task | str | None = None,
    output: str | Path | None = None,
    keep_samples: bool = False,
    mean_weights: bool = False,
    batch_size: int = 256,
    class_dim: int | None = None,
    x_key: str | Sequence[str] = "x",
    y_key: str = "y",
    model_args: Mapping[str, Any] | Sequence[str] | None = None,
    seed: int = 0,
    device: str | None = None,
    arch: str | None = None,
    arch_kwargs: str | Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    force: bool = False,
) -> PredictionResult:
    """Predicts with `samples` weight samples of a (fitted) checkpoint's posterior.

    Regression: the predictive mean and standard deviation, split into epistemic
    (spread of the sampled networks) and aleatoric (the fitted noise) parts.
    Classification: mean probabilities, predicted class, predictive and expected
    entropy, mutual information. With targets, metrics (RMSE and log-likelihood, or
    accuracy, log-likelihood, ECE and NLL) of the Bayesian and mean-weights models.

    Args:
        checkpoint: The checkpoint (a file or a `Checkpoint`).
        model: The model it was converted from (a file, `LoadedModel` or `nn.Module`).
        inputs: A data file (safetensors `x_key`, .npy, .npz, CSV), a `Dataset`, the
            input tensor, tensors by name (several inputs of the model), or `(x, y)`.
        samples: Weight samples.
        targets: Targets or labels (a file or a tensor): report metrics.
        task: "regression" or "classification" (default: the fitted task, else
            regression).
        output: Write the predictions to this file: .safetensors (every tensor, with
            metadata) or .csv (a row per example); "-" writes CSV to stdout.
        keep_samples: Also keep every sampled output (tensor `samples`).
        mean_weights: Predict once with the posterior means instead.
        batch_size: Inputs per batch (bounds memory).
        class_dim: Classification: the dimension of the classes in the model's
            output (default: the fitted one, else the last).
        x_key: Input tensor name in a data file, or names of several inputs (see
            `fit`).
        y_key: Target tensor name in a data file.
        model_args: Constant arguments of the model's forward (see `fit`).
        seed: Seed of the weight samples.
        device: Where to run (default "cpu").
        arch: For a state dict: confirms the architecture the checkpoint names.
        arch_kwargs: Confirms its recorded keyword arguments too (a JSON object or a
            mapping; needed when it has any).
        trust_pickle: Load a pickled `nn.Module` file (this runs its code).
        force: Overwrite `output` if it exists.

    Raises:
        InputError: If the model file is not the checkpoint's, or the data do not fit.
        UnsafeInputError: If the checkpoint names an architecture that `arch` and
            `arch_kwargs` do not confirm.
        OutputExistsError: If `output` exists and `force` is false.
        InvalidArgumentError: If `output`'s ending is not .safetensors or .csv.
    """
    for name, value in (("samples", samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    device = resolve_device(device)
    paths = file_paths(checkpoint, model, inputs, targets)
    fmt = check_destination(output, keep_samples=keep_samples) if output else None
    to_stdout = output is not None and str(output) == STDOUT
    stored = output and not to_stdout
    outputs = AtomicOutputs([output], force=force, inputs=paths) if stored else None
    ckpt = as_checkpoint(checkpoint)
    fitted = ckpt.fit or {}
    chosen = Task.parse(task if task is not None else fitted.get("task", "regression"))
    if class_dim is None:
        class_dim = (fitted.get("settings") or {}).get("class_dim", -1)
    data = as_dataset(inputs, with_target=False, targets=targets, x_key=x_key, y_key=y_key)
    constants = model_arguments(model_args)
    with opened_model(model, trust_pickle=trust_pickle, key=ckpt.source.get("key")) as loaded:
        confirm = {"arch": arch, "arch_kwargs": arch_kwargs, "model_args": constants}
        runner = open_runner(loaded, ckpt, device=device, **confirm)
    check_input(runner, data.x)
    noise = noise_of(ckpt.fit_tensors()) if chosen is Task.REGRESSION else None
    if chosen is Task.REGRESSION and noise is None:
        logger.warning(
            "the checkpoint was not fitted: no noise scale, the predictive spread "
            "is the epistemic part only"
        )
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        result = predict_dataset(
            runner,
            data,
            task=chosen,
            samples=samples,
            batch_size=batch_size,
            noise=noise,
            keep_samples=keep_samples,
            mean_weights=mean_weights,
            class_dim=class_dim,
        )
    result.summary["model_args"] = constants
    if output:
        summary = result.summary
        predictions = Predictions(
            result.tensors,
            chosen,
            summary["samples"],
            ckpt.path.name,
            estimator=summary["estimator"],
            call=runner.call.describe(data.x.names),
        )
        if outputs is None:
            write_csv(predictions, sys.stdout)
            sys.stdout.flush()
            result.output = STDOUT
            return result
        with outputs:
            write_predictions(predictions, outputs.temp(output), fmt)
        result.output = Path(output)
    return result


def predict_dataset(
    runner: Runner,
    data: Dataset,
    *,
    task: Task,
    samples: int = 32,
    batch_size: int = 256,
    noise: float | None = None,
    keep_samples: bool = False,
    mean_weights: bool = False,
    class_dim: int = -1,
) -> PredictionResult:
    """Predicts `data.x` with `samples` weight samples (or the posterior means).

    What `predict` computes, given an open runner: see there. Classification
    tensors have the classes last (`probs` `(examples, ..., classes)`).
    """
    task = Task.parse(task)
    noise = 0.0 if noise is None else noise
    choice = runner.estimator(data.x[:batch_size], mean=mean_weights)  # that of every batch
    logger.info("Predicting by %s", choice)
    draws = runner.predict_batches(data.x, samples, batch_size, mean=mean_weights)
    if task is Task.CLASSIFICATION:
        draws = classes_last(draws, class_dim, leading=1)
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
    summary.update(
        {
            "examples": len(data),
            "task": task.value,
            "samples": 1 if mean_weights else samples,
            "mean_weights": mean_weights,
            "estimator": {"estimator": choice.estimator.value, "reason": choice.reason},
        }
    )
    result = PredictionResult({k: v.contiguous() for k, v in tensors.items()}, summary)
    if data.y is not None:
        # Labels out of range or targets of another width would fail in indexing or
        # broadcast silently: refuse them with the likelihood's own message.
        likelihood = GaussianLikelihood() if task is Task.REGRESSION else CategoricalLikelihood()
        likelihood.check(draws[0], data.y)  # classes last already
        means = draws if mean_weights else runner.predict_batches(data.x, 1, batch_size, mean=True)
        if task is Task.CLASSIFICATION and not mean_weights:
            means = classes_last(means, class_dim, leading=1)
        models = (
            {"mean_weights": means} if mean_weights else {"bayesian": draws, "mean_weights": means}
        )
        result.metrics = {name: _metrics(task, d, data.y, noise) for name, d in models.items()}
    return result


def _metrics(task: Task, draws: Tensor, y: Tensor, noise: float) -> dict[str, float]:
    if task is Task.REGRESSION:
        return regression_metrics(draws, y, noise)
    metrics = classification_metrics(draws, y)
    metrics["nll"] = -metrics["log_likelihood"]
    return metrics


def noise_of(fit_tensors: dict[str, Tensor]) -> float | None:
    """The fitted regression noise scale of a checkpoint, if any."""
    log_noise = fit_tensors.get("bnnify.fit.log_noise")
    return None if log_noise is None else math.exp(float(log_noise))
