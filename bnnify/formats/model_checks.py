"""What a model's tensor must be to become Bayesian: non-empty, finite, in a dtype to compute in."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bnnify.bnn.collect import matches
from bnnify.errors import FormatError, InputError, shorten

__all__ = [
    "COMPUTE_DTYPES",
    "all_finite",
    "cast_checked",
    "check_module",
    "check_variational",
    "finite_weight",
]

# Posteriors, priors and their KL are computed in these dtypes (float8 has no arithmetic).
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHUNK = 1 << 20


def check_variational(
    name: str, dtype: torch.dtype, shape: Sequence[int], source: str, target: torch.dtype | None
) -> None:
    """Refuses, before any work, a tensor chosen to become Bayesian that cannot be.

    Args:
        name: The tensor's name in the model.
        dtype: Its dtype in the file.
        shape: Its shape.
        source: The model file, for messages.
        target: The dtype it is converted to (`--dtype`), if any.

    Raises:
        FormatError: The tensor has no elements, or a dtype nothing is computed in.
    """
    quoted = shorten(name)
    final = target or dtype
    if final not in COMPUTE_DTYPES:
        raise FormatError(
            f"{source}: tensor {quoted} is {_name(final)}, a dtype bnnify cannot compute a "
            f"posterior in (it computes in {', '.join(map(_name, COMPUTE_DTYPES))})",
            hint=f"Convert with --dtype float32, or keep it as it is with --exclude {quoted}.",
        )
    if 0 in tuple(shape):
        raise FormatError(
            f"{source}: tensor {quoted} has no elements (shape {tuple(shape)}): there is no "
            "weight to make Bayesian",
            hint=f"Keep it as it is with --exclude {quoted}, or fix the model.",
        )


def all_finite(tensor: Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN nor infinity (by chunks, no full temporary).

    `aminmax` propagates NaN and infinities and is several times faster than `isfinite`.
    """
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        if chunk.dtype not in COMPUTE_DTYPES:
            chunk = chunk.float()
        low, high = torch.aminmax(chunk)
        if not (math.isfinite(low) and math.isfinite(high)):
            return False
    return True


def finite_weight(tensor: Tensor, name: str, source: str) -> Tensor:
    """`tensor`, refused if it holds NaN or infinite values (a corrupt model)."""
    if not all_finite(tensor):
        raise InputError(
            f"{source}: tensor {shorten(name)} holds NaN or infinite values",
            hint="The model file is corrupt or the training diverged: use a sound "
            "checkpoint, or keep the tensor as it is with --exclude.",
        )
    return tensor


def cast_checked(tensor: Tensor, dtype: torch.dtype, name: str, source: str) -> Tensor:
    """`tensor` in `dtype`, refused where a finite value becomes infinite (overflow)."""
    cast = tensor.to(dtype)
    if cast.dtype == tensor.dtype or not tensor.is_floating_point() or all_finite(cast):
        return cast
    before, after = tensor.reshape(-1), cast.reshape(-1)
    for start in range(0, before.numel(), _CHUNK):
        part = slice(start, start + _CHUNK)
        lost = torch.isfinite(before[part]) & ~torch.isfinite(after[part])
        if bool(lost.any()):
            largest = float(before[part][lost].abs().max())
            raise InputError(
                f"{source}: tensor {shorten(name)} holds values up to {largest:.4g}, which "
                f"overflow {_name(dtype)} (at most {torch.finfo(dtype).max:.4g})",
                hint="Choose a wider --dtype (float32 or bfloat16), or keep the model's own.",
            )
    return cast


def check_module(
    module: nn.Module, include: Sequence[str] | None, exclude: Sequence[str], source: str
) -> None:
    """The `check_variational` and `finite_weight` rules for a module's parameters.

    Every floating-point parameter must be finite; those `include`/`exclude` choose (as
    `BayesianModule` does) must also have elements and a dtype to compute in.
    """
    for name, param in module.named_parameters():
        if not param.is_floating_point():
            continue
        chosen = (include is None or matches(name, include)) and not matches(name, exclude)
        if chosen:
            check_variational(name, param.dtype, param.shape, source, None)
        if param.dtype in COMPUTE_DTYPES:
            finite_weight(param, name, source)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
