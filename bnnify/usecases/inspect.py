"""`inspect`: what a variational checkpoint holds, and the spread of each posterior."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bnnify.bnn.prune import signal_to_noise
from bnnify.formats.checkpoint import Checkpoint
from bnnify.usecases.sources import CheckpointLike, as_checkpoint

__all__ = ["InspectResult", "ParameterStats", "inspect", "parameter_stats"]


@dataclass
class ParameterStats:
    """The posterior spread of one parameter: sigma and the signal-to-noise |mu| / sigma."""

    name: str
    shape: list[int]
    elements: int
    dtype: str
    sigma_mean: float
    sigma_min: float
    sigma_max: float
    snr_mean: float
    snr_median: float


@dataclass
class InspectResult:
    """What a checkpoint holds (what `bnnify inspect` prints)."""

    path: Path
    files: list[Path]
    bytes: int
    metadata: dict[str, str]
    source: dict[str, Any]
    spec: dict[str, Any]
    fit: dict[str, Any] | None
    variational_elements: int
    deterministic: dict[str, dict[str, Any]]
    parameters: list[ParameterStats]

    def to_json(self) -> dict[str, Any]:
        """The result as `bnnify inspect --json` prints it."""
        return {
            "path": str(self.path),
            "files": [str(f) for f in self.files],
            "bytes": self.bytes,
            "format": self.metadata["bnnify.format"],
            "format_version": self.metadata["bnnify.format_version"],
            "bnnify_version": self.metadata.get("bnnify.version"),
            "torch_version": self.metadata.get("torch.version"),
            "source": self.source,
            "spec": self.spec,
            "fit": self.fit,
            "variational_elements": self.variational_elements,
            "deterministic": self.deterministic,
            "parameters": [asdict(p) for p in self.parameters],
        }


def inspect(path: CheckpointLike) -> InspectResult:
    """The metadata, files and per-parameter posterior statistics of a checkpoint.

    Args:
        path: A checkpoint file, the index of a sharded one, or a `Checkpoint`.

    Raises:
        InputError: If the file is missing or unreadable.
        FormatError: If it is not a bnnify checkpoint of a supported version.
    """
    ckpt = as_checkpoint(path)
    files = sorted(set(ckpt.files.values()) | {ckpt.path})
    return InspectResult(
        path=Path(path) if isinstance(path, (str, Path)) else ckpt.path,
        files=files,
        bytes=sum(f.stat().st_size for f in files),
        metadata=dict(ckpt.metadata),
        source=ckpt.source,
        spec=ckpt.spec.to_json(),
        fit=ckpt.fit,
        variational_elements=ckpt.num_elements(),
        deterministic={n: r.to_json() for n, r in ckpt.deterministic.items()},
        parameters=parameter_stats(ckpt),
    )


@torch.no_grad()
def parameter_stats(ckpt: Checkpoint, device: str = "cpu") -> list[ParameterStats]:
    """Per parameter: shape, sigma statistics and signal-to-noise ratio |mu| / sigma."""
    rows = []
    for name, record in ckpt.parameters.items():
        dist = ckpt.posterior(name, device).distribution
        sigma = dist.stddev.double().reshape(-1)
        snr = signal_to_noise(dist)
        empty = sigma.numel() == 0
        rows.append(
            ParameterStats(
                name=name,
                shape=record.shape,
                elements=math.prod(record.shape),
                dtype=record.dtype,
                sigma_mean=0.0 if empty else float(sigma.mean()),
                sigma_min=0.0 if empty else float(sigma.min()),
                sigma_max=0.0 if empty else float(sigma.max()),
                snr_mean=0.0 if empty else float(snr.mean()),
                snr_median=0.0 if empty else float(snr.median()),
            )
        )
    return rows
