"""What a checkpoint must satisfy before anything computes with it: metadata, shapes, values.

A checkpoint is data from elsewhere. Its metadata says which tensors hold each posterior
and prior; these checks hold the file to it (roles, shapes and dtypes), so that a KL or a
prediction is never computed from tensors that do not fit together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bnnify.errors import BnnifyError, FormatError, shorten
from bnnify.formats.model_checks import all_finite
from bnnify.formats.safetensors_layout import TensorInfo

__all__ = [
    "LOG_NOISE_KEY",
    "check_log_noise",
    "check_parameter",
    "check_spread",
    "check_tensor",
    "parse_dtype",
    "record_fields",
    "require_finite",
]

LOG_NOISE_KEY = "bnnify.fit.log_noise"
_FLOAT32 = torch.finfo(torch.float32)
# exp(log_noise) must be a positive, finite float32 noise scale.
_LOG_NOISE_RANGE = (math.log(_FLOAT32.tiny), math.log(_FLOAT32.max))
_FIELDS = {
    "parameter": ({"shape", "dtype", "tensors"}, {"prior_tensors", "aliases"}),
    "tensor": ({"kind", "shape", "dtype"}, set()),
}


def record_fields(name: Any, record: Any, kind: str, source: str) -> dict[str, Any]:
    """The fields of one record of `bnnify.parameters` or `bnnify.deterministic`, typed."""
    required, optional = _FIELDS[kind]
    where = f"{source}: {kind} record {shorten(name)}"
    if not isinstance(name, str) or not isinstance(record, dict):
        raise FormatError(f"{where} is not a name and an object")
    keys = set(record)
    if not required <= keys <= required | optional:
        raise FormatError(
            f"{where} has the keys {shorten(sorted(keys))}, expected {sorted(required)}"
            + (f" and optionally {sorted(optional)}" if optional else "")
        )
    shape = record["shape"]
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise FormatError(f"{where} has shape {shorten(shape)}, not a list of sizes")
    parse_dtype(record["dtype"], where)
    for field in ("tensors", "prior_tensors"):
        value = record.get(field, {})
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise FormatError(f"{where}: {field!r} must map names to tensor keys")
    aliases = record.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise FormatError(f"{where}: 'aliases' must be a list of names")
    if kind == "tensor" and record["kind"] not in ("parameter", "buffer", "unknown"):
        raise FormatError(f"{where} has kind {shorten(record['kind'])}")
    return {"name": name, **record}


def parse_dtype(name: Any, where: str) -> torch.dtype:
    """The torch dtype called `name` ("float32"), refusing anything else."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f"{where} has dtype {shorten(name)}, which is not a torch dtype")
    return dtype


def check_tensor(key: str, info: TensorInfo | None, shape: Any, dtype: Any, where: str) -> None:
    """Refuses a tensor missing from the file or differing from what the metadata says."""
    if info is None:
        raise FormatError(
            f"{where}: the metadata names tensor {shorten(key)}, not in the file",
            hint="A shard of a sharded checkpoint is not a checkpoint on its own: open its "
            "*.safetensors.index.json.",
        )
    expected = (tuple(shape), dtype)
    if (info.shape, info.dtype) != expected:
        raise FormatError(
            f"{where}: tensor {shorten(key)} is {_describe(info.dtype)} {info.shape}, but the "
            f"metadata says {_describe(dtype)} {tuple(shape)}",
            hint="The checkpoint is corrupt or was edited: convert the model again.",
        )


def check_parameter(
    record: Any, spec: Any, infos: Mapping[str, TensorInfo | None], where: str
) -> None:
    """Holds one parameter's posterior and prior tensors to its posterior and prior specs.

    The roles (`mu`, `rho`...) must be those the posterior has, each with the shape and
    dtype the posterior gives a parameter of the recorded shape; likewise the prior's
    non-scalar buffers.
    """
    from bnnify.bnn import get_posterior, get_prior

    meta = torch.empty(record.shape, dtype=parse_dtype(record.dtype, where), device="meta")
    try:
        posterior = get_posterior(spec.posterior, meta).state_dict()
        prior = {k: t for k, t in get_prior(spec.prior, meta).named_buffers() if t.dim() > 0}
    except (BnnifyError, RuntimeError, ValueError, TypeError) as error:
        raise FormatError(f"{where}: its spec cannot describe it ({error})") from None
    for what, expected, keys in (
        ("posterior", posterior, record.tensors),
        ("prior", prior, record.prior_tensors),
    ):
        if set(keys) != set(expected):
            raise FormatError(
                f"{where}: {what} tensors {shorten(sorted(keys))}, but the "
                f"{what} {getattr(spec, what)[0]!r} has {sorted(expected)}",
                hint="The checkpoint is corrupt or was edited: convert the model again.",
            )
        for role, key in keys.items():
            like = expected[role]
            check_tensor(key, infos.get(key), like.shape, like.dtype, where)


def require_finite(tensor: Tensor, key: str, source: str) -> Tensor:
    """`tensor`, refused if it holds NaN or infinite values."""
    if tensor.is_floating_point() and not all_finite(tensor):
        raise FormatError(
            f"{source}: tensor {shorten(key)} holds NaN or infinite values",
            hint="The checkpoint is corrupt, or came from a diverged fit: convert or fit again.",
        )
    return tensor


def check_spread(rho: Tensor, key: str, source: str) -> Tensor:
    """`rho`, refused where sigma = softplus(rho) rounds to 0 (no Gaussian has that spread).

    softplus increases, so the smallest rho decides; it is taken in the dtype sigma is
    computed in.
    """
    if rho.numel() == 0:
        return rho
    compute = torch.promote_types(rho.dtype, torch.float32)
    lowest = rho.detach().min().to(compute)
    if not bool(F.softplus(lowest) > 0):
        raise FormatError(
            f"{source}: tensor {shorten(key)} holds values down to {float(lowest):.4g}, "
            "for which sigma = softplus(rho) is 0",
            hint="The checkpoint is corrupt or was edited: convert or fit again.",
        )
    return rho


def check_log_noise(tensor: Tensor, source: str) -> Tensor:
    """The fitted log noise scale: one finite number whose exp is a float32 noise scale."""
    if tensor.numel() != 1 or not tensor.is_floating_point():
        raise FormatError(
            f"{source}: {LOG_NOISE_KEY} must be one floating-point number, got "
            f"{_describe(tensor.dtype)} of shape {tuple(tensor.shape)}"
        )
    value = float(tensor.reshape(()))
    low, high = _LOG_NOISE_RANGE
    if not low < value < high:
        raise FormatError(
            f"{source}: {LOG_NOISE_KEY} is {value:.6g}: the noise scale exp({value:.6g}) is "
            "not a positive finite number",
            hint=f"A fitted log noise lies between {low:.1f} and {high:.1f}: fit again.",
        )
    return tensor.reshape(())


def _describe(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
