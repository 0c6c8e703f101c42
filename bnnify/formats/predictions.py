"""The predictions file of `bnnify predict`: predictive tensors as safetensors, described."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from torch import Tensor

from bnnify.enums import Task
from bnnify.errors import FormatError, InvalidArgumentError, clip, shorten
from bnnify.formats.safetensors_io import save_file
from bnnify.formats.safetensors_reader import SafetensorsFile
from bnnify.formats.strict_json import load_json

__all__ = [
    "PREDICTIONS_FORMAT",
    "PREDICTIONS_VERSION",
    "STDOUT",
    "Predictions",
    "check_destination",
    "read_predictions",
    "write_csv",
    "write_predictions",
]

# The output name of standard output: predictions are a stream, written there as CSV.
STDOUT = "-"
_ENDINGS = (".safetensors", ".csv")

PREDICTIONS_FORMAT = "bnnify.predictions"
PREDICTIONS_VERSION = "1"


@dataclass
class Predictions:
    """The tensors of a predictions file and what made them.

    Attributes:
        tensors: Regression: `mean`, `std`, `epistemic_std`, `aleatoric_std`;
            classification: `probs`, `predicted`, `predictive_entropy`,
            `expected_entropy`, `mutual_information`; `samples` when kept (of the
            calibrated predictive, if calibrated); `targets` when given, and
            `input.<name>` when kept.
        task: The task the model was run for.
        samples: Weight samples per prediction (1 for the posterior means).
        checkpoint: File name of the checkpoint that made them.
        estimator: How the samples were drawn, `{"estimator": ..., "reason": ...}`
            (see `bnnify.bnn.EstimatorChoice`).
        call: What each parameter of the model's forward received (`"input NAME"`
            or a constant argument).
        calibration: The calibration applied to the predictive, `{"temperature":
            T}` or `{"scale": s}` with the `model` it belongs to; None if none was.
    """

    tensors: dict[str, Tensor]
    task: Task
    samples: int
    checkpoint: str
    estimator: dict[str, str] | None = None
    call: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None


def check_destination(path: str | Path, *, keep_samples: bool = False) -> str:
    """The format predictions are written in at `path`: "safetensors" or "csv" (also "-").

    Raises:
        InvalidArgumentError: The ending is not .safetensors or .csv (nothing is written
            in another format than the name says), or `keep_samples` asks for the
            samples in CSV (a table has no room for them).
    """
    name = str(path)
    ending = ".csv" if name == STDOUT else Path(name).suffix.lower()
    if ending not in _ENDINGS:
        raise InvalidArgumentError(
            f"cannot write predictions to '{clip(name)}': the ending {ending or '(none)'!r} "
            f"is not a supported format (supported: {', '.join(_ENDINGS)}, or - for CSV on "
            "stdout)",
            hint="Name the file preds.safetensors (every tensor, with metadata) or preds.csv.",
        )
    if ending == ".csv" and keep_samples:
        raise InvalidArgumentError(
            "--keep-samples stores a tensor per sample, which a CSV table cannot hold",
            hint="Write the predictions to a .safetensors file to keep the samples.",
        )
    return ending.removeprefix(".")


def write_csv(predictions: Predictions, stream: TextIO) -> None:
    """One row per example: a column per tensor (`name_i` per element when it has several)."""
    columns, blocks = [], []
    for name, tensor in predictions.tensors.items():
        block = tensor.detach().cpu().reshape(tensor.shape[0], -1) if tensor.dim() else None
        if block is None:
            continue
        width = block.shape[1]
        columns += [name] if width == 1 else [f"{name}_{i}" for i in range(width)]
        blocks.append(block.tolist())
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(columns)
    for row in zip(*blocks, strict=True):
        writer.writerow([repr(v) if isinstance(v, float) else v for part in row for v in part])


def write_predictions(predictions: Predictions, path: str | Path, fmt: str = "safetensors") -> None:
    """Writes `predictions` to `path` (use an `AtomicOutputs` temp path for safety) in `fmt`,
    the format of the name the user gave (see `check_destination`)."""
    if fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as stream:
            write_csv(predictions, stream)
        return
    metadata = {
        "bnnify.format": PREDICTIONS_FORMAT,
        "bnnify.format_version": PREDICTIONS_VERSION,
        "bnnify.task": Task(predictions.task).value,
        "bnnify.samples": str(predictions.samples),
        "bnnify.checkpoint": predictions.checkpoint,
    }
    if predictions.estimator is not None:
        metadata["bnnify.estimator"] = predictions.estimator["estimator"]
        metadata["bnnify.estimator_reason"] = predictions.estimator["reason"]
    if predictions.call is not None:
        metadata["bnnify.call"] = json.dumps(predictions.call, sort_keys=True)
    if predictions.calibration is not None:
        metadata["bnnify.calibration"] = json.dumps(predictions.calibration, sort_keys=True)
    tensors = {k: v.contiguous() for k, v in predictions.tensors.items()}
    save_file(tensors, path, metadata)


def read_predictions(path: str | Path) -> Predictions:
    """Reads a predictions file.

    Raises:
        FormatError: If the file is not a predictions file of a supported version.
        InputError: If it cannot be read.
    """
    reader = SafetensorsFile(path, "predictions file")
    metadata = reader.metadata
    if metadata.get("bnnify.format") != PREDICTIONS_FORMAT:
        raise FormatError(
            f"{path}: not a bnnify predictions file",
            hint="Write one with `bnnify predict ... --out FILE`.",
        )
    version = metadata.get("bnnify.format_version")
    if version != PREDICTIONS_VERSION:
        raise FormatError(
            f"{path}: predictions format version {shorten(version)} is not supported "
            f"(this bnnify reads version {PREDICTIONS_VERSION})",
            hint="Predict again with this version of bnnify.",
        )
    try:
        estimator = None
        if "bnnify.estimator" in metadata:
            estimator = {
                "estimator": metadata["bnnify.estimator"],
                "reason": metadata.get("bnnify.estimator_reason", ""),
            }
        call = metadata.get("bnnify.call")
        calibration = metadata.get("bnnify.calibration")
        if calibration is not None:
            calibration = load_json(calibration, str(path), "metadata 'bnnify.calibration'")
        return Predictions(
            tensors={name: reader.tensor(name) for name in reader.infos},
            task=Task(metadata["bnnify.task"]),
            samples=int(metadata["bnnify.samples"]),
            checkpoint=metadata["bnnify.checkpoint"],
            estimator=estimator,
            call=None if call is None else load_json(call, str(path), "metadata 'bnnify.call'"),
            calibration=calibration,
        )
    except (KeyError, ValueError) as error:
        raise FormatError(f"{path}: malformed predictions metadata ({clip(str(error))})") from None
