"""`kl`: KL(posterior || prior) of a checkpoint, parameter by parameter, or a saved KL report."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bnnify.bnn import get_prior
from bnnify.bnn.kl_report import parameter_kl
from bnnify.bnn.kl_training import default_samples
from bnnify.enums import KLMethod, Reduction
from bnnify.errors import SpecError
from bnnify.formats.atomic import AtomicOutputs
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.report import KLReport, checked_kl, is_report, read_report, write_report
from bnnify.formats.spec import Args, Component, resolve_device, resolve_prior
from bnnify.usecases import LOGGER_NAME
from bnnify.usecases.seeding import seeded
from bnnify.usecases.sources import CheckpointLike, Progress, as_checkpoint, file_paths

__all__ = ["KLResult", "checkpoint_kl", "kl"]

logger = logging.getLogger(LOGGER_NAME)


@dataclass
class KLResult:
    """A KL report and its value under `reduction` (what `bnnify kl` prints).

    Attributes:
        report: The per-parameter KL.
        reduction: "sum" over every element, or "mean" per element.
        output: Where the report was written, if it was.
        from_report: Whether the input was a saved report (nothing was computed).
    """

    report: KLReport
    reduction: Reduction = Reduction.SUM
    output: Path | None = None
    from_report: bool = False

    @property
    def value(self) -> float:
        """The KL under `reduction`."""
        return self.report.total if self.reduction is Reduction.SUM else self.report.mean

    def to_json(self) -> dict[str, Any]:
        """The result as `bnnify kl --json` prints it."""
        return {**self.report.to_json(), "reduction": self.reduction.value, "kl": self.value}


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
        OutputExistsError: If `output` exists and `force` is false.
    """
    reduction = Reduction.parse(reduction)
    if isinstance(path, (str, Path)) and is_report(path):
        if prior or prior_args or mc_samples or output:
            logger.warning("the input is a KL report: --prior, --mc-samples and --out are ignored")
        return KLResult(read_report(path), reduction, from_report=True)
    device = resolve_device(device)
    outputs = AtomicOutputs([output], force=force, inputs=file_paths(path)) if output else None
    ckpt = as_checkpoint(path)
    override = resolve_prior(ckpt.spec.prior, prior, prior_args) if prior or prior_args else None
    report = checkpoint_kl(
        ckpt, prior=override, mc_samples=mc_samples, device=device, seed=seed, progress=progress
    )
    if outputs is not None:
        with outputs:
            write_report(report, outputs.temp(output))
        logger.info("wrote %s", output)
    return KLResult(report, reduction, None if output is None else Path(output))


def _prior(
    ckpt: Checkpoint, name: str, spec: tuple, like: torch.Tensor, device: str, recorded: bool
) -> Any:
    prior = get_prior(spec, like)
    if recorded:
        for buffer, tensor in ckpt.prior_state(name, device).items():
            setattr(prior, buffer, tensor)
    return prior


@torch.no_grad()
def checkpoint_kl(
    ckpt: Checkpoint,
    *,
    prior: tuple[str, dict] | None = None,
    mc_samples: int | None = None,
    device: str = "cpu",
    seed: int | None = None,
    progress: Progress | None = None,
) -> KLReport:
    """KL(posterior || prior) of every parameter of `ckpt`, one parameter at a time.

    Args:
        ckpt: The checkpoint.
        prior: A prior spec replacing the recorded one.
        mc_samples: Monte Carlo samples per element (default: the closed form when
            one is known, else `DEFAULT_MC_SAMPLES`).
        device: Where to compute.
        seed: Seed of the Monte Carlo noise (default: the checkpoint's), drawn per
            parameter as `bnnify convert` does, so that its report is reproduced.
        progress: Called with (elements of the parameter, total elements) after each.

    Raises:
        SpecError: If the prior needs the original weights (empirical prior) and the
            checkpoint does not carry them.
        InputError: If a KL comes out NaN or negative (see `checked_kl`), or a tensor
            of the checkpoint is not finite.
    """
    spec = prior if prior is not None else ckpt.spec.prior
    names, values, numels = [], [], []
    samples = mc_samples
    seed = ckpt.spec.seed if seed is None else seed
    closed_form_checked = mc_samples is not None
    total = ckpt.num_elements()
    for name, record in ckpt.parameters.items():
        posterior = ckpt.posterior(name, device)
        like = posterior.mean.detach()
        if spec[0] == "empirical_gaussian" and not record.prior_tensors:
            raise SpecError(
                "the empirical_gaussian prior is centred on the original weights, which this "
                "checkpoint does not store",
                hint="Recompute with the recorded prior, or convert again with that prior.",
            )
        p = _prior(ckpt, name, spec, like, device, recorded=spec[0] == ckpt.spec.prior[0])
        if samples is None and not closed_form_checked:
            samples = default_samples(posterior, p)
            closed_form_checked = True
        with seeded(seed, f"kl:{name}", device):
            value = parameter_kl(posterior, p, samples)
        names.append(name)
        numels.append(math.prod(record.shape))
        method = KLMethod.ANALYTIC if samples is None else KLMethod.MONTE_CARLO
        values.append(
            checked_kl(
                float(value), name=name, elements=numels[-1], method=method, source=str(ckpt.path)
            )
        )
        if progress:
            progress(numels[-1], total)
    method = KLMethod.ANALYTIC if samples is None else KLMethod.MONTE_CARLO
    return KLReport(
        names=names,
        per_parameter=torch.tensor(values, dtype=torch.float64),
        numels=torch.tensor(numels, dtype=torch.int64),
        method=method,
        samples=samples,
        posterior={"name": ckpt.spec.posterior[0], "kwargs": dict(ckpt.spec.posterior[1])},
        prior={"name": spec[0], "kwargs": dict(spec[1])},
        checkpoint={"name": ckpt.path.name, "source_sha256": ckpt.source.get("sha256")},
    )
