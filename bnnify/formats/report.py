"""The KL report file: total and per-parameter KL divergence, as safetensors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bnnify.enums import KLMethod
from bnnify.errors import FormatError, InputError
from bnnify.formats.safetensors_io import load_file, read_header, save_file

__all__ = ["REPORT_FORMAT", "KLReport", "is_report", "read_report", "write_report"]

REPORT_FORMAT = "bnnify.kl_report"
REPORT_VERSION = "1"


@dataclass
class KLReport:
    """KL(posterior || prior) of a variational checkpoint.

    Attributes:
        names: Parameter names, in the order of the vectors below.
        per_parameter: Summed KL of each parameter (float64).
        numels: Number of elements of each parameter (int64).
        method: How the KL was computed: analytic or Monte Carlo.
        samples: Monte Carlo samples per element (None when analytic).
        posterior: Posterior spec `{"name": ..., "kwargs": {...}}`.
        prior: Prior spec `{"name": ..., "kwargs": {...}}`.
        checkpoint: `{"name": ..., "sha256": ...}` of the checkpoint it describes.
    """

    names: list[str]
    per_parameter: torch.Tensor
    numels: torch.Tensor
    method: KLMethod
    samples: int | None
    posterior: dict[str, Any]
    prior: dict[str, Any]
    checkpoint: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(self.per_parameter.sum())

    @property
    def mean(self) -> float:
        count = int(self.numels.sum())
        return self.total / count if count else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "kl_sum": self.total,
            "kl_mean": self.mean,
            "elements": int(self.numels.sum()),
            "method": KLMethod(self.method).value,
            "samples": self.samples,
            "posterior": self.posterior,
            "prior": self.prior,
            "checkpoint": self.checkpoint,
            "parameters": [
                {"name": n, "kl": float(k), "elements": int(c)}
                for n, k, c in zip(self.names, self.per_parameter, self.numels, strict=True)
            ],
        }


def write_report(report: KLReport, path: str | Path) -> None:
    """Writes `report` to `path` (use an `AtomicOutputs` temp path for safety)."""
    tensors = {
        "kl.sum": torch.tensor(report.total, dtype=torch.float64),
        "kl.mean": torch.tensor(report.mean, dtype=torch.float64),
        "kl.per_parameter": report.per_parameter.to(torch.float64).contiguous(),
        "numel.per_parameter": report.numels.to(torch.int64).contiguous(),
    }
    metadata = {
        "bnnify.format": REPORT_FORMAT,
        "bnnify.format_version": REPORT_VERSION,
        "bnnify.names": json.dumps(report.names),
        "bnnify.method": KLMethod(report.method).value,
        "bnnify.samples": json.dumps(report.samples),
        "bnnify.posterior": json.dumps(report.posterior, sort_keys=True),
        "bnnify.prior": json.dumps(report.prior, sort_keys=True),
        "bnnify.checkpoint": json.dumps(report.checkpoint, sort_keys=True),
    }
    save_file(tensors, path, metadata)


def is_report(path: str | Path) -> bool:
    """Whether `path` is a bnnify KL report (by its header)."""
    try:
        metadata, _ = read_header(path)
    except (InputError, OSError):  # FormatError is an InputError
        return False
    return metadata.get("bnnify.format") == REPORT_FORMAT


def read_report(path: str | Path) -> KLReport:
    """Reads a KL report.

    Raises:
        FormatError: If the file is not a KL report of a supported version.
    """
    metadata, _ = read_header(path)
    if metadata.get("bnnify.format") != REPORT_FORMAT:
        raise FormatError(f"{path}: not a bnnify KL report")
    version = metadata.get("bnnify.format_version")
    if version != REPORT_VERSION:
        raise FormatError(
            f"{path}: KL report format version {version!r} is not supported "
            f"(this bnnify reads version {REPORT_VERSION})",
            hint="Recompute the report with `bnnify kl CHECKPOINT --out ...`.",
        )
    try:
        tensors = load_file(path)
        names = json.loads(metadata["bnnify.names"])
        report = KLReport(
            names=names,
            per_parameter=tensors["kl.per_parameter"],
            numels=tensors["numel.per_parameter"],
            method=KLMethod(metadata["bnnify.method"]),
            samples=json.loads(metadata["bnnify.samples"]),
            posterior=json.loads(metadata["bnnify.posterior"]),
            prior=json.loads(metadata["bnnify.prior"]),
            checkpoint=json.loads(metadata.get("bnnify.checkpoint", "{}")),
        )
    except (KeyError, ValueError, TypeError) as error:
        raise FormatError(f"{path}: malformed KL report ({error})") from None
    if len(report.names) != report.per_parameter.numel():
        raise FormatError(f"{path}: malformed KL report (names and values differ in length)")
    return report
