"""`predict`: predictions with their uncertainty from a checkpoint, and metrics against targets."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bnnify.bnn.calibration import apply_calibration
from bnnify.bnn.likelihood import CategoricalLikelihood, GaussianLikelihood
from bnnify.bnn.metrics import ood_detection
from bnnify.enums import Task
from bnnify.errors import InvalidArgumentError, UsageError
from bnnify.formats.atomic import AtomicOutputs
from bnnify.formats.calibration import Calibration, read_calibration
from bnnify.formats.data import Dataset
from bnnify.formats.model_inputs import Inputs
from bnnify.formats.predictions import (
    STDOUT,
    Predictions,
    check_destination,
    write_csv,
    write_predictions,
)
from bnnify.formats.spec import resolve_device
from bnnify.usecases import LOGGER_NAME
from bnnify.usecases.calibrate import applied_calibration, calibration_summary, check_calibration
from bnnify.usecases.model_call import model_arguments
from bnnify.usecases.predictive import (
    BAYESIAN,
    MEAN_WEIGHTS,
    draw_predictions,
    noise_of,
    scores,
    summarise,
)
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
        tensors: The predictions (see `formats.predictions`); the file also holds the
            targets, and the inputs when asked.
        summary: Examples, task, samples, the estimator (`{"estimator": ...,
            "reason": ...}`), the calibration applied (`{"applied": ...}`) and mean
            uncertainties; classification: the class counts over every position.
        metrics: With targets, the metrics of the Bayesian model and of the
            mean-weights model (`{"bayesian": {...}, "mean_weights": {...}}`).
        ood: With out-of-distribution inputs, per model and score (predictive
            entropy, mutual information, max softmax) the `auroc` and `aupr`.
        output: Where the predictions were written, if they were.
    """

    tensors: dict[str, Tensor]
    summary: dict[str, Any]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    ood: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    output: Path | str | None = None

    def to_json(self) -> dict[str, Any]:
        """The result as `bnnify predict --json` prints it."""
        return {
            "schema": "bnnify.predict/1",
            "summary": self.summary,
            "metrics": self.metrics,
            "ood": self.ood or None,
            "output": None if self.output is None else str(self.output),
        }


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
    keep_inputs: bool = False,
    mean_weights: bool = False,
    calibration: bool = True,
    ood: DataLike | None = None,
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
    entropy, mutual information. A calibrated checkpoint (`bnnify calibrate`) has its
    temperature or spread scale applied. With targets, the metrics of
    `bnnify.bnn.metrics` (`scores`) for the Bayesian and mean-weights models.

    Args:
        checkpoint: The checkpoint (a file or a `Checkpoint`).
        model: The model it was converted from (a file, `LoadedModel` or `nn.Module`).
        inputs: A data file (safetensors `x_key`, .npy, .npz, CSV), a `Dataset`, the
            input tensor, tensors by name (several inputs of the model), or `(x, y)`.
        samples: Weight samples.
        targets: Targets or labels (a file or a tensor): report metrics.
        task: "regression" or "classification" (default: the fitted task, else
            regression).
        output: Write the predictions (with the targets) to this file: .safetensors
            (every tensor, with metadata) or .csv (a row per example); "-" writes CSV to
            stdout.
        keep_samples: Also keep every sampled output (tensor `samples`).
        keep_inputs: Also write the inputs to `output` (tensors `input.<name>`).
        mean_weights: Predict once with the posterior means instead.
        calibration: Apply the checkpoint's calibration, if it has one.
        ood: Out-of-distribution inputs (classification; as `inputs`): report how
            well each uncertainty score tells them from `inputs`.
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
        UsageError: For out-of-distribution inputs of a regression, or a calibration
            of another task than the one predicted.
        UnsafeInputError: If the checkpoint names an architecture that `arch` and
            `arch_kwargs` do not confirm.
        OutputExistsError: If `output` exists and `force` is false.
        InvalidArgumentError: If `output`'s ending is not .safetensors or .csv.
    """
    for name, value in (("samples", samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    device = resolve_device(device)
    paths = file_paths(checkpoint, model, inputs, targets, ood)
    fmt = check_destination(output, keep_samples=keep_samples) if output else None
    to_stdout = output is not None and str(output) == STDOUT
    stored = output and not to_stdout
    outputs = AtomicOutputs([output], force=force, inputs=paths) if stored else None
    ckpt = as_checkpoint(checkpoint)
    fitted = ckpt.fit or {}
    chosen = Task.parse(task if task is not None else fitted.get("task", "regression"))
    if ood is not None and chosen is not Task.CLASSIFICATION:
        raise UsageError(
            "out-of-distribution detection scores classifiers (entropy, mutual information)",
            hint="Drop --ood, or predict with --task classification.",
        )
    calibrated = read_calibration(ckpt) if calibration else None
    check_calibration(calibrated, chosen, ckpt)
    if class_dim is None:
        class_dim = (fitted.get("settings") or {}).get("class_dim", -1)
    data = as_dataset(inputs, with_target=False, targets=targets, x_key=x_key, y_key=y_key)
    outliers = None if ood is None else as_dataset(ood, with_target=False, x_key=x_key).x
    constants = model_arguments(model_args)
    with opened_model(model, trust_pickle=trust_pickle, key=ckpt.source.get("key")) as loaded:
        confirm = {"arch": arch, "arch_kwargs": arch_kwargs, "model_args": constants}
        runner = open_runner(loaded, ckpt, device=device, **confirm)
    check_input(runner, data.x)
    if outliers is not None:
        check_input(runner, outliers)
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
            calibration=calibrated,
            ood=outliers,
        )
    result.summary["model_args"] = constants
    result.summary["calibration"] = calibration_summary(calibrated, ckpt, mean_weights)
    if output:
        tensors = dict(result.tensors)
        if data.y is not None:
            tensors["targets"] = data.y
        if keep_inputs:
            tensors.update({f"input.{name}": tensor for name, tensor in data.x})
        summary = result.summary
        predictions = Predictions(
            tensors,
            chosen,
            summary["samples"],
            ckpt.path.name,
            estimator=summary["estimator"],
            call=runner.call.describe(data.x.names),
            calibration=applied_calibration(calibrated, mean_weights),
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
    calibration: Calibration | None = None,
    ood: Inputs | None = None,
) -> PredictionResult:
    """Predicts `data.x` with `samples` weight samples (or the posterior means).

    What `predict` computes, given an open runner: see there. Classification
    tensors have the classes last (`probs` `(examples, ..., classes)`). The
    out-of-distribution inputs `ood` are sampled after `data.x`, whose samples are
    therefore those of a run without them.
    """
    task = Task.parse(task)
    classification = task is Task.CLASSIFICATION
    choice = runner.estimator(data.x[:batch_size], mean=mean_weights)  # that of every batch
    logger.info("Predicting by %s", choice)
    record = calibration.record if calibration is not None else {}
    fitted_by = (record.get("estimator") or {}).get("estimator")
    if not mean_weights and fitted_by not in (None, choice.estimator.value):
        logger.warning(
            "the calibration was fitted on samples drawn by %s, these are drawn by %s: "
            "calibrate on inputs shaped like these",
            fitted_by,
            choice.estimator.value,
        )

    def run(x: Inputs, model: str) -> tuple[Tensor, float]:
        mean = model == MEAN_WEIGHTS
        draws = draw_predictions(runner, x, task, samples, batch_size, mean, class_dim)
        raw = 0.0 if noise is None else noise
        if calibration is None:
            return draws, raw
        value = calibration.value(mean_weights=mean)
        return apply_calibration(draws, raw, value, classification=classification)

    main = MEAN_WEIGHTS if mean_weights else BAYESIAN
    runs = {main: run(data.x, main)}
    outliers = {main: run(ood, main)} if ood is not None else {}
    draws, scale = runs[main]
    result = PredictionResult(*summarise(task, draws, scale, keep_samples))
    result.summary.update(
        {
            "examples": len(data),
            "task": task.value,
            "samples": 1 if mean_weights else samples,
            "mean_weights": mean_weights,
            "estimator": {"estimator": choice.estimator.value, "reason": choice.reason},
        }
    )
    if data.y is None and ood is None:
        return result
    if not mean_weights:
        runs[MEAN_WEIGHTS] = run(data.x, MEAN_WEIGHTS)
    if data.y is not None:
        # Labels out of range or targets of another width would fail in indexing or
        # broadcast silently: refuse them with the likelihood's own message.
        likelihood = CategoricalLikelihood() if classification else GaussianLikelihood()
        likelihood.check(draws[0], data.y)  # classes last already
        result.metrics = {name: scores(task, d, data.y, n) for name, (d, n) in runs.items()}
    if ood is not None:
        result.summary["ood_examples"] = len(ood)
        for name, (inside, _) in runs.items():
            outside = outliers[name][0] if name in outliers else run(ood, name)[0]
            result.ood[name] = ood_detection(inside, outside)
    return result
