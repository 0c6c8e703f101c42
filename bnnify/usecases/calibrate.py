"""`calibrate`: a temperature or a spread scale fitted on held-out data, in a new checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import bnnify
from bnnify.bnn.calibration import BOUNDS, fit_spread_scale, fit_temperature
from bnnify.bnn.calibration import apply_calibration as calibrated
from bnnify.bnn.likelihood import CategoricalLikelihood, GaussianLikelihood
from bnnify.enums import Task
from bnnify.errors import InputError, InvalidArgumentError, UsageError
from bnnify.formats.atomic import AtomicOutputs
from bnnify.formats.calibration import (
    CALIBRATION_KEY,
    MODELS,
    PARAMETERS,
    Calibration,
    read_calibration,
)
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.checkpoint_writer import copy_checkpoint
from bnnify.formats.data import Dataset
from bnnify.formats.detect import sha256_file
from bnnify.formats.spec import resolve_device
from bnnify.formats.strict_json import finite_json
from bnnify.usecases import LOGGER_NAME
from bnnify.usecases.model_call import model_arguments
from bnnify.usecases.predictive import MEAN_WEIGHTS, draw_predictions, noise_of, scores
from bnnify.usecases.runner import check_input, open_runner
from bnnify.usecases.sources import (
    CheckpointLike,
    DataLike,
    ModelLike,
    as_checkpoint,
    as_dataset,
    derived_name,
    file_paths,
    opened_model,
    path_of,
)

__all__ = [
    "CalibrationResult",
    "applied_calibration",
    "calibrate",
    "calibration_summary",
    "check_calibration",
]

logger = logging.getLogger(LOGGER_NAME)


@dataclass
class CalibrationResult:
    """What `calibrate` fitted and wrote (what `bnnify calibrate` prints).

    Attributes:
        output: The calibrated checkpoint.
        calibration: The calibration, as recorded under `bnnify.calibration`: per model
            the `temperature` or `scale`, `at_bound`, and the validation metrics
            `before` and `after` it; the data, samples, seed and estimator.
    """

    output: Path
    calibration: Calibration

    def to_json(self) -> dict[str, Any]:
        """The result as `bnnify calibrate --json` prints it."""
        record = self.calibration.record
        return {"schema": "bnnify.calibrate/1", "output": str(self.output), **record}


def calibrate(
    checkpoint: CheckpointLike,
    model: ModelLike,
    data: DataLike,
    *,
    samples: int = 32,
    task: Task | str | None = None,
    output: str | Path | None = None,
    batch_size: int = 256,
    class_dim: int | None = None,
    x_key: str | Sequence[str] = "x",
    y_key: str = "y",
    target: str | None = None,
    model_args: Mapping[str, Any] | Sequence[str] | None = None,
    seed: int = 0,
    device: str | None = None,
    arch: str | None = None,
    arch_kwargs: str | Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    force: bool = False,
) -> CalibrationResult:
    """Fits a calibration on held-out data and writes it into a copy of the checkpoint.

    Classification: a temperature T dividing each weight sample's logits before the
    softmax; regression: a scale s of the predictive's spread around its mean (every
    sampled output f_s -> mean + s (f_s - mean), the noise -> s * noise: variance
    times s^2). Each minimises the validation NLL of the predictive that `predict`
    computes with the same `samples` and `seed`, over [0.01, 100], and never does
    worse there than no calibration. The Bayesian model and the mean-weights model
    are calibrated apart. `predict` applies the calibration of the checkpoint.

    Args:
        checkpoint: The (fitted) checkpoint; it is read, never modified.
        model: The model it was converted from (a file, `LoadedModel` or `nn.Module`).
        data: Held-out data with targets, as `fit`'s: not the data the posterior was
            fitted on (predictions fit those better than new data: a calibration on
            them would make the predictive over-confident; this is warned about).
        samples: Weight samples (as `predict`'s).
        task: "regression" or "classification" (default: the fitted task).
        output: The calibrated checkpoint [default: `<checkpoint>.cal.safetensors`].
        batch_size: Inputs per batch.
        class_dim: Classification: the classes' dimension (default: the fitted one).
        x_key: Input tensor name(s) in a data file (see `fit`).
        y_key: Target tensor name in a data file.
        target: CSV target column.
        model_args: Constant arguments of the model's forward (see `fit`).
        seed: Seed of the weight samples (as `predict`'s).
        device: Where to run (default "cpu").
        arch: For a state dict: confirms the architecture the checkpoint names.
        arch_kwargs: Confirms its recorded keyword arguments too.
        trust_pickle: Load a pickled `nn.Module` file (this runs its code).
        force: Overwrite `output` if it exists.

    Raises:
        UsageError: Without a task, or for a regression checkpoint never fitted (it
            has no noise scale).
        InputError: If the model is not the checkpoint's, or the data do not fit it.
        UnsafeInputError: If the checkpoint names an architecture that `arch` and
            `arch_kwargs` do not confirm.
        OutputExistsError: If `output` exists and `force` is false.
    """
    for name, value in (("samples", samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    device = resolve_device(device)
    destination = Path(output) if output is not None else derived_name(path_of(checkpoint), "cal")
    outputs = AtomicOutputs([destination], force=force, inputs=file_paths(checkpoint, model, data))
    ckpt = as_checkpoint(checkpoint)
    fitted = ckpt.fit or {}
    chosen = _task(task, ckpt)
    noise = noise_of(ckpt.fit_tensors()) if chosen is Task.REGRESSION else 0.0
    if noise is None:
        raise UsageError(
            f"{ckpt.path.name} was never fitted: a regression predictive needs the noise "
            "scale that `fit` learns before it can be calibrated",
            hint="Run `bnnify fit` first, then calibrate the fitted checkpoint.",
        )
    if class_dim is None:
        class_dim = (fitted.get("settings") or {}).get("class_dim", -1)
    dataset = as_dataset(data, x_key=x_key, y_key=y_key, target=target)
    constants = model_arguments(model_args)
    with opened_model(model, trust_pickle=trust_pickle, key=ckpt.source.get("key")) as loaded:
        confirm = {"arch": arch, "arch_kwargs": arch_kwargs, "model_args": constants}
        runner = open_runner(loaded, ckpt, device=device, **confirm)
    check_input(runner, dataset.x)
    described = _data_record(data, dataset, ckpt)
    choice = runner.estimator(dataset.x[:batch_size])  # as predict's
    logger.info("Calibrating on %d examples; predictions by %s", len(dataset), choice)
    if read_calibration(ckpt) is not None:
        logger.info("%s is calibrated already: the new calibration replaces it", ckpt.path.name)
    devices = [device] if torch.device(device).type == "cuda" else []
    draws = {}
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for model_name in MODELS:  # the Bayesian model first: predict's samples
            mean = model_name == MEAN_WEIGHTS
            draws[model_name] = draw_predictions(
                runner, dataset.x, chosen, samples, batch_size, mean, class_dim
            )
    likelihood = CategoricalLikelihood() if chosen is Task.CLASSIFICATION else GaussianLikelihood()
    likelihood.check(draws[MODELS[0]][0], dataset.y)
    record: dict[str, Any] = {"task": chosen.value, "parameter": PARAMETERS[chosen]}
    for model_name, outputs_of_model in draws.items():
        record[model_name] = _fit_one(chosen, outputs_of_model, dataset.y, noise, model_name)
    record |= {
        "data": described,
        "samples": samples,
        "seed": seed,
        "estimator": {"estimator": choice.estimator.value, "reason": choice.reason},
        "bounds": list(BOUNDS),
    }
    if chosen is Task.CLASSIFICATION:
        record["class_dim"] = class_dim
    if all(record[m]["at_bound"] for m in MODELS):
        raise InputError(
            f"no {PARAMETERS[chosen]} can be fitted on {described['name']}: for both models "
            "the validation NLL keeps falling to the end of the range searched",
            hint="Calibrate on more (or harder) held-out data, or predict uncalibrated.",
        )
    calibration = Calibration(chosen, {m: record[m][PARAMETERS[chosen]] for m in MODELS}, record)
    calibration.record = finite_json(record)
    metadata = {k: v for k, v in ckpt.metadata.items() if k != "total_size"}
    metadata |= {"bnnify.version": bnnify.__version__, "torch.version": torch.__version__}
    metadata[CALIBRATION_KEY] = calibration.to_metadata()
    with outputs:
        copy_checkpoint(ckpt, outputs.temp(destination), metadata)
    return CalibrationResult(destination, calibration)


def _task(task: Task | str | None, ckpt: Checkpoint) -> Task:
    if task is not None:
        return Task.parse(task)
    fitted = (ckpt.fit or {}).get("task")
    if fitted is None:
        raise UsageError(
            f"{ckpt.path.name} was never fitted: choose the task with --task regression "
            "or --task classification"
        )
    return Task.parse(fitted)


def _fit_one(
    task: Task, draws: torch.Tensor, y: torch.Tensor, noise: float, model: str
) -> dict[str, Any]:
    """One model's parameter, and its validation metrics before and after it."""
    classification = task is Task.CLASSIFICATION
    fit = fit_temperature(draws, y) if classification else fit_spread_scale(draws, noise, y)
    value = fit.value
    if fit.at_bound:
        # The likelihood keeps rising toward the bound (separable labels, or outputs
        # unrelated to the targets): no value is estimated, and the bound's would be the
        # most over- (or under-) confident the search allows. Leave the model as it is.
        value = 1.0
        logger.warning(
            "the %s model is left uncalibrated: its validation NLL keeps falling up to %s "
            "%.3g, the end of the range searched %s (its outputs separate these labels "
            "perfectly, or say nothing about them); calibrate on more, harder held-out data",
            model.replace("_", " "),
            PARAMETERS[task],
            fit.value,
            list(BOUNDS),
        )
    after = calibrated(draws, noise, value, classification=classification)
    return {
        PARAMETERS[task]: value,
        "at_bound": fit.at_bound,
        "optimum": fit.value,
        "before": scores(task, draws, y, noise),
        "after": scores(task, *after[:1], y, after[1]),
    }


def _data_record(data: DataLike, dataset: Dataset, ckpt: Checkpoint) -> dict[str, Any]:
    """Name, digest and size of the calibration data; warns if the fit trained on them."""
    is_file = isinstance(data, (str, Path))
    name = Path(data).name if is_file else dataset.source
    digest = sha256_file(data) if is_file else None
    fitted = ckpt.fit or {}
    same = (digest is not None and digest == fitted.get("data_sha256")) or (
        is_file and name == fitted.get("data")
    )
    if same:
        logger.warning(
            "%s is the data the posterior was fitted on: predictions fit their training "
            "data better than new data, so a calibration fitted on them makes the "
            "predictive over-confident on new inputs; calibrate on held-out data",
            name,
        )
    return {"name": name, "sha256": digest, "examples": len(dataset), "fit_data": same}


# ------------------------------------------------------ what predict does with it


def check_calibration(calibration: Calibration | None, task: Task, ckpt: Checkpoint) -> None:
    """Refuses to apply a calibration of another task than the one predicted.

    Raises:
        UsageError: The tasks differ.
    """
    if calibration is not None and calibration.task is not task:
        raise UsageError(
            f"{ckpt.path.name} is calibrated for {calibration.task.value}, not {task.value}",
            hint="Predict its task, or pass --no-calibration (calibration=False).",
        )


def calibration_summary(
    calibration: Calibration | None, ckpt: Checkpoint, mean_weights: bool = False
) -> dict[str, Any]:
    """What `predict` reports of the calibration: applied or not (and why not).

    Applied: the `parameter` name, its `value` for the model predicted, the values
    of both models (`bayesian`, `mean_weights`), and the calibration data's name.
    """
    if calibration is None:
        ignored = CALIBRATION_KEY in ckpt.metadata
        reason = "ignored on request" if ignored else "the checkpoint is not calibrated"
        return {"applied": False, "reason": reason}
    record = calibration.record
    return {
        "applied": True,
        "parameter": calibration.parameter,
        "value": calibration.value(mean_weights),
        **calibration.values,
        "data": (record.get("data") or {}).get("name"),
        "samples": record.get("samples"),
    }


def applied_calibration(calibration: Calibration | None, mean_weights: bool) -> dict | None:
    """The calibration of a predictions file's tensors (`bnnify.calibration` there)."""
    if calibration is None:
        return None
    model = MEAN_WEIGHTS if mean_weights else "bayesian"
    return {calibration.parameter: calibration.value(mean_weights), "model": model}
