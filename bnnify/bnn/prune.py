"""Pruning by signal-to-noise ratio |mu| / sigma (Blundell et al., 2015), for Gaussian posteriors.

A pruned weight keeps its place in the posterior, so a pruned model is still a
Bayesian model of the same shape: its mean becomes 0 and its spread the smallest one
the dtype holds as a normal number (times e^2, `pruned_sigma`), so that every sample
of it is 0 to within 1e-37 in float32 and bfloat16 (2e-307 in float64; 5e-4 in
float16, whose range stops there). Its KL divergence to the prior is then that of a
near point mass: about -log(sigma), 85 nats per element in float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution

from bnnify.errors import InvalidArgumentError

__all__ = ["prune_gaussian", "pruned_rho", "pruned_sigma", "pruning_masks", "signal_to_noise"]


def signal_to_noise(distribution: Distribution) -> Tensor:
    """|mean| / stddev of a posterior, flat, in float64 (no overflow for tiny spreads).

    Example:
        >>> from torch.distributions import Normal
        >>> signal_to_noise(Normal(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 4.0])))
        tensor([2.0000, 0.2500], dtype=torch.float64)
    """
    mean = distribution.mean.detach().double().reshape(-1)
    return mean.abs() / distribution.stddev.detach().double().reshape(-1)


def pruned_rho(dtype: torch.dtype) -> float:
    """The rho of a pruned weight in `dtype`: softplus(rho) = e^2 times its smallest normal.

    Example:
        >>> round(pruned_rho(torch.float32), 2)
        -85.34
    """
    tiny = torch.finfo(dtype).tiny * math.e**2
    rounded = torch.tensor(math.log(math.expm1(tiny)), dtype=dtype)
    return float(rounded)


def pruned_sigma(dtype: torch.dtype) -> float:
    """The spread of a pruned weight in `dtype`, as `softplus` computes it there."""
    return float(F.softplus(torch.tensor(pruned_rho(dtype), dtype=dtype)))


def pruning_masks(
    snr: Mapping[str, Tensor],
    *,
    keep: float | None = None,
    threshold: float | None = None,
    groups: Mapping[str, str] | None = None,
) -> dict[str, Tensor]:
    """Which elements to prune (True), from each parameter's flat signal-to-noise ratios.

    Exactly one of `keep` and `threshold`. With `keep`, the `floor(keep * n + 1/2)`
    elements of highest ratio stay in each group of n elements (all parameters together unless
    `groups` maps each name to a group); ties are pruned in the order of `snr`, element
    by element, so the result does not depend on the sort. With `threshold`, every
    element whose ratio is below it is pruned.

    Raises:
        InvalidArgumentError: For a fraction outside [0, 1], a negative or non-finite
            threshold, or both or neither given.

    Example:
        >>> masks = pruning_masks({"w": torch.tensor([3.0, 0.5, 2.0, 0.1])}, keep=0.5)
        >>> masks["w"].tolist()
        [False, True, False, True]
    """
    if (keep is None) == (threshold is None):
        raise InvalidArgumentError("give exactly one of keep and threshold")
    if keep is not None and not (isinstance(keep, (int, float)) and 0.0 <= keep <= 1.0):
        raise InvalidArgumentError(
            f"the fraction of weights to keep must be in [0, 1], got {keep!r}",
            hint="E.g. 0.05 keeps the 5% of weights with the highest |mu| / sigma.",
        )
    if threshold is not None:
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)) or threshold < 0:
            raise InvalidArgumentError(
                f"the signal-to-noise threshold must be a finite number >= 0, got {threshold!r}",
                hint="E.g. 1.0 prunes every weight whose |mu| is below its sigma.",
            )
        return {name: values < threshold for name, values in snr.items()}
    by_group: dict[str, list[str]] = {}
    for name in snr:
        by_group.setdefault("" if groups is None else groups[name], []).append(name)
    masks = {}
    for names in by_group.values():
        masks.update(_keep_top(snr, names, float(keep)))
    return masks


def _keep_top(snr: Mapping[str, Tensor], names: list[str], keep: float) -> dict[str, Tensor]:
    flat = torch.cat([snr[name].reshape(-1) for name in names])
    total = flat.numel()
    removed = total - math.floor(keep * total + 0.5)
    mask = torch.zeros(total, dtype=torch.bool)
    if removed > 0:
        order = torch.sort(flat, stable=True).indices
        mask[order[:removed]] = True
    parts = torch.split(mask, [snr[name].numel() for name in names])
    return {name: part.view(snr[name].shape) for name, part in zip(names, parts, strict=True)}


def prune_gaussian(mu: Tensor, rho: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """New `(mu, rho)` with the masked elements pruned: mu = 0, rho = `pruned_rho`.

    Example:
        >>> mu, rho = prune_gaussian(torch.ones(2), torch.zeros(2), torch.tensor([True, False]))
        >>> mu.tolist(), rho[1].item(), F.softplus(rho[0]).item() < 1e-36
        ([0.0, 1.0], 0.0, True)
    """
    mask = mask.to(mu.device).view(mu.shape)
    return mu.masked_fill(mask, 0.0), rho.masked_fill(mask, pruned_rho(rho.dtype))
