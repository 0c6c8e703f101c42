"""The KL report file: total and per-parameter KL divergence, as safetensors.

Read without torch (`bnnify kl REPORT` prints one in a fraction of a second); torch is
imported only to write one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnnify.enums import KLMethod
from bnnify.errors import FormatError, InputError, shorten
from bnnify.formats.safetensors_header import Header, read_vector
from bnnify.formats.strict_json import load_json

__all__ = [
    "REPORT_FORMAT",
    "KLReport",
    "checked_kl",
    "is_report",
    "kl_total",
    "read_report",
    "write_report",
]

logger = logging.getLogger("bnnify")

REPORT_FORMAT = "bnnify.kl_report"
REPORT_VERSION = "1"


@dataclass
class KLReport:
    """KL(posterior || prior) of a variational checkpoint.

    Attributes:
        names: Parameter names, in the order of the vectors below.
        per_parameter: Summed KL of each parameter.
        numels: Number of elements of each parameter.
        method: How the KL was computed: analytic or Monte Carlo.
        samples: Monte Carlo samples per element (None when analytic).
        posterior: Posterior spec `{"name": ..., "kwargs": {...}}`.
        prior: Prior spec `{"name": ..., "kwargs": {...}}`.
        checkpoint: `{"name": ..., "sha256": ...}` of the checkpoint it describes.
    """

    names: list[str]
    per_parameter: list[float]
    numels: list[int]
    method: KLMethod
    samples: int | None
    posterior: dict[str, Any]
    prior: dict[str, Any]
    checkpoint: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return kl_total(self.per_parameter)

    @property
    def elements(self) -> int:
        return sum(self.numels)

    @property
    def mean(self) -> float:
        count = self.elements
        return self.total / count if count else 0.0

    def kl_json(self) -> dict[str, Any]:
        """The KL block every command's JSON shares: sum, mean, method, samples."""
        method = KLMethod(self.method).value
        return {"sum": self.total, "mean": self.mean, "method": method, "samples": self.samples}

    def ranked(self) -> list[int]:
        """Parameter indices, largest KL first (ties in storage order)."""
        return sorted(range(len(self.names)), key=lambda i: -self.per_parameter[i])

    def to_json(self, top: int | None = None) -> dict[str, Any]:
        """The report as JSON; with `top`, the `top` parameters of largest KL (0: all)."""
        order = self.ranked() if top is not None else range(len(self.names))
        shown = list(order)[:top] if top else list(order)
        total = self.total or 1.0
        return {
            "kl": self.kl_json(),
            "elements": self.elements,
            "posterior": self.posterior,
            "prior": self.prior,
            "checkpoint": self.checkpoint,
            "parameter_count": len(self.names),
            "parameters": [
                {
                    "name": self.names[i],
                    "elements": self.numels[i],
                    "kl": self.per_parameter[i],
                    "kl_mean": self.per_parameter[i] / max(self.numels[i], 1),
                    "share": self.per_parameter[i] / total,
                }
                for i in shown
            ],
        }


def kl_total(values: Iterable[float]) -> float:
    """The total of per-parameter KL values, exactly rounded: any two callers agree.

    Example:
        >>> kl_total([0.1, 0.2, 0.3]) == 0.6
        True

    Raises:
        InputError: The total is not finite (it overflows float64, or a value is NaN
            or infinite): there is no KL to report.
    """
    try:
        total = math.fsum(values)
    except OverflowError:
        total = math.inf
    if not math.isfinite(total):
        raise InputError(
            f"the total KL divergence is {total} (it overflows float64, or a parameter's KL "
            "is not finite): there is no KL to report",
            hint="Check the prior's arguments and the posterior spreads (bnnify inspect).",
        )
    return total


def write_report(report: KLReport, path: str | Path) -> None:
    """Writes `report` to `path` (use an `AtomicOutputs` temp path for safety)."""
    import torch  # writing only: a report is read without torch

    from bnnify.formats.safetensors_io import save_file

    tensors = {
        "kl.sum": torch.tensor(report.total, dtype=torch.float64),
        "kl.mean": torch.tensor(report.mean, dtype=torch.float64),
        "kl.per_parameter": torch.tensor(report.per_parameter, dtype=torch.float64),
        "numel.per_parameter": torch.tensor(report.numels, dtype=torch.int64),
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
        metadata = Header(path, official=False).metadata
    except InputError:  # FormatError is an InputError
        return False
    return metadata.get("bnnify.format") == REPORT_FORMAT


def checked_kl(value: float, *, name: str, elements: int, method: KLMethod, source: str) -> float:
    """A parameter's KL divergence as it may be reported: finite and not negative.

    KL >= 0 always. A closed form below zero by more than rounding means the posterior
    and prior tensors do not fit together, and is refused. A Monte Carlo estimate is
    noisy and may fall below zero when the posterior is close to the prior; it is reported
    as 0, which is never farther from the true value than the estimate itself.

    Raises:
        InputError: The value is NaN or infinite, or a closed form is negative.
    """
    if not math.isfinite(value):
        raise InputError(
            f"{source}: the KL divergence of parameter {shorten(name)} is {value}: its "
            "posterior or prior has a spread of zero or infinity",
            hint="Check the checkpoint's mu and rho, and the prior's arguments.",
        )
    if value >= 0:
        return value
    rounding = _ROUNDING * max(elements, 1)
    if method == KLMethod.MONTE_CARLO or value >= -rounding:
        if value < -rounding:
            logger.warning("the Monte Carlo KL estimate of %s, %.6g, is reported as 0", name, value)
        return 0.0
    raise InputError(
        f"{source}: the KL divergence of parameter {shorten(name)} comes out negative "
        f"({value:.6g}): its posterior and prior tensors do not fit together",
        hint="The checkpoint is corrupt or was edited: convert the model again.",
    )


def read_report(path: str | Path) -> KLReport:
    """Reads a KL report, checking it describes what `bnnify kl` would have written.

    Raises:
        FormatError: If the file is not a KL report of a supported version, or is malformed.
    """
    reader = Header(path, "KL report", official=False)
    metadata = reader.metadata
    if metadata.get("bnnify.format") != REPORT_FORMAT:
        raise FormatError(f"{path}: not a bnnify KL report")
    version = metadata.get("bnnify.format_version")
    if version != REPORT_VERSION:
        raise FormatError(
            f"{path}: KL report format version {shorten(version)} is not supported "
            f"(this bnnify reads version {REPORT_VERSION})",
            hint="Recompute the report with `bnnify kl CHECKPOINT --out ...`.",
        )
    source = str(path)
    try:
        fields = {key: _json(metadata, key, source) for key in _JSON_FIELDS}
        report = KLReport(
            names=fields["names"],
            per_parameter=_vector(reader, "kl.per_parameter", "F64"),
            numels=_vector(reader, "numel.per_parameter", "I64"),
            method=metadata["bnnify.method"],
            samples=fields["samples"],
            posterior=fields["posterior"],
            prior=fields["prior"],
            checkpoint=fields["checkpoint"],
        )
    except KeyError as error:
        raise _malformed(path, f"no {error}") from None
    _check(report, path)
    report.method = KLMethod(report.method)
    return report


_ROUNDING = 1e-5
_JSON_FIELDS = ("names", "samples", "posterior", "prior", "checkpoint")


def _json(metadata: dict[str, str], key: str, source: str) -> Any:
    text = metadata.get(f"bnnify.{key}", "{}" if key == "checkpoint" else None)
    if text is None:
        raise KeyError(f"bnnify.{key}")
    try:
        return load_json(text, source, f"metadata 'bnnify.{key}'")
    except FormatError as error:
        raise _malformed(source, error.message.removeprefix(f"{source}: ")) from None


def _vector(reader: Header, key: str, code: str) -> list:
    entry = reader.entries.get(key)
    if entry is None or entry.code != code or len(entry.shape) != 1:
        raise _malformed(reader.path, f"{key!r} is not a {code} vector")
    return read_vector(reader, key)


def _check(report: KLReport, path: str | Path) -> None:
    names, values, numels = report.names, report.per_parameter, report.numels
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _malformed(path, "the names are not a list of strings")
    if not len(names) == len(values) == len(numels):
        raise _malformed(path, "names and values differ in length")
    if report.method not in {m.value for m in KLMethod}:
        raise _malformed(path, f"unknown method {shorten(report.method)}")
    samples = report.samples
    if (samples is None) != (report.method == KLMethod.ANALYTIC) or not (
        samples is None or (type(samples) is int and samples > 0)
    ):
        raise _malformed(path, f"{shorten(samples)} samples for method {report.method!r}")
    if not all(isinstance(p, dict) for p in (report.posterior, report.prior, report.checkpoint)):
        raise _malformed(path, "posterior, prior and checkpoint must be JSON objects")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise _malformed(path, "a KL value is negative, NaN or infinite")
    if any(n < 0 for n in numels):
        raise _malformed(path, "an element count is negative")


def _malformed(path: str | Path, problem: str) -> FormatError:
    return FormatError(
        f"{path}: malformed KL report ({problem})",
        hint="Recompute the report with `bnnify kl CHECKPOINT --out ...`.",
    )
