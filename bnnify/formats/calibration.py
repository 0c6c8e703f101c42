"""The calibration record of a checkpoint: metadata key `bnnify.calibration` (docs/format.md)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from bnnify.enums import Task
from bnnify.errors import FormatError, shorten
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.checkpoint_header import metadata_json

__all__ = ["CALIBRATION_KEY", "MODELS", "PARAMETERS", "Calibration", "read_calibration"]

CALIBRATION_KEY = "bnnify.calibration"
# The fitted number of each task: the logits are divided by it, or the spread multiplied.
PARAMETERS = {Task.CLASSIFICATION: "temperature", Task.REGRESSION: "scale"}
# Each model that predict reports is calibrated on its own.
MODELS = ("bayesian", "mean_weights")


@dataclass
class Calibration:
    """A checkpoint's calibration: one parameter per model, and how it was fitted.

    Attributes:
        task: The task it calibrates.
        values: Model ("bayesian", "mean_weights") -> the temperature or the scale.
        record: The whole record as stored (data, samples, seed, estimator, metrics).
    """

    task: Task
    values: dict[str, float]
    record: dict[str, Any]

    @property
    def parameter(self) -> str:
        """ "temperature" (classification) or "scale" (regression)."""
        return PARAMETERS[self.task]

    def value(self, mean_weights: bool = False) -> float:
        """The parameter of the Bayesian model, or of the mean-weights model."""
        return self.values["mean_weights" if mean_weights else "bayesian"]

    def to_metadata(self) -> str:
        """The JSON string stored under `CALIBRATION_KEY`."""
        return json.dumps(self.record, sort_keys=True, allow_nan=False)


def read_calibration(checkpoint: Checkpoint) -> Calibration | None:
    """The calibration recorded in `checkpoint`, None if it has none.

    Raises:
        FormatError: If the record is malformed (a parameter that is not a positive
            number, an unknown task, a model missing).
    """
    if CALIBRATION_KEY not in checkpoint.metadata:
        return None
    source = str(checkpoint.path)
    record = metadata_json(checkpoint.metadata, CALIBRATION_KEY, source, dict)
    try:
        task = Task(record.get("task"))
    except ValueError:
        raise _malformed(source, f"task {shorten(record.get('task'))}") from None
    parameter = PARAMETERS[task]
    if record.get("parameter") != parameter:
        raise _malformed(source, f"parameter {shorten(record.get('parameter'))}")
    values = {}
    for model in MODELS:
        entry = record.get(model)
        value = entry.get(parameter) if isinstance(entry, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _malformed(source, f"no {parameter} for the {model.replace('_', ' ')} model")
        if not (math.isfinite(value) and value > 0):
            raise _malformed(source, f"{parameter} {value!r} is not a positive number")
        values[model] = float(value)
    return Calibration(task, values, record)


def _malformed(source: str, what: str) -> FormatError:
    return FormatError(
        f"{source}: malformed calibration metadata '{CALIBRATION_KEY}' ({what})",
        hint="Calibrate the uncalibrated checkpoint again with `bnnify calibrate`.",
    )
