"""Per-parameter posterior spread (sigma, |mu|/sigma) of a checkpoint: the torch side of inspect."""

from __future__ import annotations

import math

import torch

from bnnify.bnn.prune import signal_to_noise
from bnnify.formats.checkpoint import Checkpoint
from bnnify.usecases.inspect import ParameterStats

__all__ = ["parameter_stats"]


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
