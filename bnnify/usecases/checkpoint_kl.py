"""KL(posterior || prior) of a checkpoint's parameters, one at a time (the torch side of `kl`)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from bnnify.bnn import get_prior
from bnnify.bnn.kl_report import parameter_kl
from bnnify.bnn.kl_training import default_samples
from bnnify.enums import KLMethod
from bnnify.errors import SpecError
from bnnify.formats.atomic import AtomicOutputs
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.report import KLReport, checked_kl, write_report
from bnnify.formats.spec import Args, Component, resolve_device, resolve_prior
from bnnify.usecases import LOGGER_NAME
from bnnify.usecases.seeding import seeded
from bnnify.usecases.sources import CheckpointLike, Progress, as_checkpoint, file_paths

__all__ = ["checkpoint_kl", "kl_of_checkpoint"]

logger = logging.getLogger(LOGGER_NAME)


def kl_of_checkpoint(
    path: CheckpointLike,
    *,
    prior: Component | None,
    prior_args: Args,
    mc_samples: int | None,
    device: str | None,
    seed: int | None,
    output: str | Path | None,
    force: bool,
    progress: Progress | None,
) -> KLReport:
    """`bnnify.kl` of a checkpoint: its report, written to `output` if given."""
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
    return report


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
        progress: Called with (elements done, total elements) as each chunk of a
            parameter is done (a large tensor or a long Monte Carlo KL shows movement).

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

    def advance(elements: int) -> None:
        if progress is not None:
            progress(elements, total)

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
            value = parameter_kl(posterior, p, samples, advance)
        names.append(name)
        numels.append(math.prod(record.shape))
        method = KLMethod.ANALYTIC if samples is None else KLMethod.MONTE_CARLO
        values.append(
            checked_kl(
                float(value), name=name, elements=numels[-1], method=method, source=str(ckpt.path)
            )
        )
    method = KLMethod.ANALYTIC if samples is None else KLMethod.MONTE_CARLO
    return KLReport(
        names=names,
        per_parameter=values,
        numels=numels,
        method=method,
        samples=samples,
        posterior={"name": ckpt.spec.posterior[0], "kwargs": dict(ckpt.spec.posterior[1])},
        prior={"name": spec[0], "kwargs": dict(spec[1])},
        checkpoint={"name": ckpt.path.name, "source_sha256": ckpt.source.get("sha256")},
    )
