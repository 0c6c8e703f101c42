"""`kl`: KL(posterior || prior) of a checkpoint, parameter by parameter, or a saved KL report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnnify.enums import Reduction
from bnnify.errors import InvalidArgumentError
from bnnify.formats.report import KLReport, is_report, read_report

if TYPE_CHECKING:
    from bnnify.formats.spec import Args, Component
    from bnnify.usecases.sources import CheckpointLike, Progress

__all__ = ["KLResult", "kl"]


@dataclass
class KLResult:
    """A KL report and its value under `reduction` (what `bnnify kl` prints).

    Attributes:
        report: The per-parameter KL.
        reduction: "sum" over every element, or "mean" per element.
        output: Where the report was written, if it was.
        from_report: Whether the input was a saved report (nothing was computed).
        path: The file the KL was read or computed from.
    """

    report: KLReport
    reduction: Reduction = Reduction.SUM
    output: Path | None = None
    from_report: bool = False
    path: Path | None = None

    @property
    def value(self) -> float:
        """The KL under `reduction`."""
        return self.report.total if self.reduction is Reduction.SUM else self.report.mean

    def to_json(self, top: int | None = None) -> dict[str, Any]:
        """The result as `bnnify kl --json` prints it (with `top`: see `KLReport.to_json`)."""
        return {
            "path": None if self.path is None else str(self.path),
            "from_report": self.from_report,
            "reduction": self.reduction.value,
            "value": self.value,
            **self.report.to_json(top),
            "output": None if self.output is None else str(self.output),
        }


def kl(
    path: CheckpointLike,
    *,
    prior: Component | None = None,
    prior_args: Args = (),
    reduction: Reduction | str = Reduction.SUM,
    mc_samples: int | None = None,
    device: str | None = None,
    seed: int | None = None,
    output: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> KLResult:
    """KL(posterior || prior) of a variational checkpoint, or the content of a KL report.

    Args:
        path: A checkpoint (file, sharded index, or `Checkpoint`), or a KL report file.
        prior: A prior replacing the recorded one: a name or `(name, kwargs)`.
        prior_args: Prior arguments merged over the recorded ones (or over `prior`'s).
        reduction: "sum" or "mean" (per element), for `KLResult.value`.
        mc_samples: Monte Carlo samples per element (default: closed form when known).
        device: Where to compute (default "cpu").
        seed: Seed of the Monte Carlo noise (default: the checkpoint's).
        output: Write the KL report to this file.
        force: Overwrite `output` if it exists.
        progress: Called with (elements done, total elements) after each parameter.

    Raises:
        SpecError: For an invalid prior or device.
        InvalidArgumentError: For an invalid reduction.
        InputError: If `path` is neither a checkpoint nor a KL report.
        InvalidArgumentError: If `path` is a KL report and options for a checkpoint are given.
        OutputExistsError: If `output` exists and `force` is false.
    """
    reduction = Reduction.parse(reduction)
    where = Path(path) if isinstance(path, (str, Path)) else None
    if where is not None and is_report(where):
        given = {"--prior": prior, "--prior-arg": prior_args, "--mc-samples": mc_samples}
        given |= {"--out": output, "--device": device, "--seed": seed}
        extra = [flag for flag, value in given.items() if value is not None and value != ()]
        if extra:
            raise InvalidArgumentError(
                f"'{where}' is a KL report: {', '.join(extra)} apply to a checkpoint only "
                "(a report's KL is read, not computed)",
                hint="Pass the checkpoint instead to recompute the KL with other options.",
            )
        return KLResult(read_report(where), reduction, from_report=True, path=where)
    # The torch side, imported only for a checkpoint: a report is read without torch.
    from bnnify.usecases.checkpoint_kl import kl_of_checkpoint

    report = kl_of_checkpoint(
        path,
        prior=prior,
        prior_args=prior_args,
        mc_samples=mc_samples,
        device=device,
        seed=seed,
        output=output,
        force=force,
        progress=progress,
    )
    written = None if output is None else Path(output)
    return KLResult(report, reduction, written, path=where)
