"""`inspect`: what a variational checkpoint holds, and the spread of each posterior.

The metadata is read without torch (`CheckpointHeader`); the posterior statistics,
which need the tensors, only when asked for (`stats=True`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnnify.formats.checkpoint_header import CheckpointHeader

if TYPE_CHECKING:
    from bnnify.usecases.sources import CheckpointLike

__all__ = ["InspectResult", "ParameterStats", "inspect"]


@dataclass
class ParameterStats:
    """A parameter's shape and, when computed, its posterior spread: sigma and the
    signal-to-noise ratio |mu| / sigma (None when not computed)."""

    name: str
    shape: list[int]
    elements: int
    dtype: str
    sigma_mean: float | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    snr_mean: float | None = None
    snr_median: float | None = None


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
    sharded: bool = False

    def to_json(self) -> dict[str, Any]:
        """The result as `bnnify inspect --json` prints it."""
        return {
            "path": str(self.path),
            "kind": "sharded" if self.sharded else "file",
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
            "parameter_count": len(self.parameters),
            "parameters": [asdict(p) for p in self.parameters],
        }


def inspect(path: CheckpointLike, *, stats: bool = False) -> InspectResult:
    """The metadata, files and (with `stats`) per-parameter posterior statistics.

    Args:
        path: A checkpoint file, the index of a sharded one, the folder holding either,
            or a `Checkpoint`.
        stats: Read the tensors for sigma and |mu|/sigma per parameter (imports torch);
            without, only the metadata is read.

    Raises:
        InputError: If the file is missing or unreadable.
        FormatError: If it is not a bnnify checkpoint of a supported version.
    """
    given = path if isinstance(path, (str, Path)) else path.path
    header = CheckpointHeader(given)
    parameters = [
        ParameterStats(name, r["shape"], math.prod(r["shape"]), r["dtype"])
        for name, r in header.parameters.items()
    ]
    if stats:
        # The torch side, only for the statistics.
        from bnnify.usecases.parameter_stats import parameter_stats
        from bnnify.usecases.sources import as_checkpoint

        parameters = parameter_stats(
            as_checkpoint(path if not isinstance(path, (str, Path)) else header.path)
        )
    return InspectResult(
        path=Path(given),
        files=header.files,
        bytes=sum(f.stat().st_size for f in header.files),
        metadata=header.metadata,
        source=header.source,
        spec=header.spec,
        fit=header.fit,
        variational_elements=sum(p.elements for p in parameters),
        deterministic=header.deterministic,
        parameters=parameters,
        sharded=header.sharded,
    )
