"""What `bnnify kl` and `bnnify inspect` compute from a checkpoint, tensor by tensor."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from bnnify.bnn import get_prior
from bnnify.bnn.kl import DEFAULT_MC_SAMPLES, default_samples
from bnnify.bnn.kl_report import parameter_kl
from bnnify.bnn.posteriors import restore_posterior
from bnnify.errors import SpecError
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.report import KLReport, checked_kl
from bnnify.usecases.seeding import seeded

__all__ = ["DEFAULT_MC_SAMPLES", "checkpoint_kl", "parameter_stats"]


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
    progress: Callable[[int], None] | None = None,
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
        progress: Called with the elements of each parameter when it is done.

    Raises:
        SpecError: If the prior needs the original weights (empirical prior) and the
            checkpoint does not carry them.
    """
    spec = prior if prior is not None else ckpt.spec.prior
    names, values, numels = [], [], []
    samples = mc_samples
    seed = ckpt.spec.seed if seed is None else seed
    closed_form_checked = mc_samples is not None
    for name, record in ckpt.parameters.items():
        state = ckpt.posterior_state(name, device)
        like = next(iter(state.values()))
        posterior = restore_posterior(ckpt.spec.posterior, state, like)
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
        method = "analytic" if samples is None else "monte_carlo"
        values.append(
            checked_kl(
                float(value), name=name, elements=numels[-1], method=method, source=str(ckpt.path)
            )
        )
        if progress:
            progress(numels[-1])
    return KLReport(
        names=names,
        per_parameter=torch.tensor(values, dtype=torch.float64),
        numels=torch.tensor(numels, dtype=torch.int64),
        method="analytic" if samples is None else "monte_carlo",
        samples=samples,
        posterior={"name": ckpt.spec.posterior[0], "kwargs": dict(ckpt.spec.posterior[1])},
        prior={"name": spec[0], "kwargs": dict(spec[1])},
        checkpoint={"name": ckpt.path.name, "source_sha256": ckpt.source.get("sha256")},
    )


@torch.no_grad()
def parameter_stats(ckpt: Checkpoint, device: str = "cpu") -> list[dict[str, Any]]:
    """Per parameter: shape, sigma statistics and signal-to-noise ratio |mu| / sigma."""
    rows = []
    for name, record in ckpt.parameters.items():
        state = ckpt.posterior_state(name, device)
        like = next(iter(state.values()))
        dist = restore_posterior(ckpt.spec.posterior, state, like).distribution
        sigma = dist.stddev.double().reshape(-1)
        snr = dist.mean.double().abs().reshape(-1) / sigma
        rows.append(
            {
                "name": name,
                "shape": record.shape,
                "elements": math.prod(record.shape),
                "dtype": record.dtype,
                "sigma_mean": float(sigma.mean()) if sigma.numel() else 0.0,
                "sigma_min": float(sigma.min()) if sigma.numel() else 0.0,
                "sigma_max": float(sigma.max()) if sigma.numel() else 0.0,
                "snr_mean": float(snr.mean()) if snr.numel() else 0.0,
                "snr_median": float(snr.median()) if snr.numel() else 0.0,
            }
        )
    return rows
