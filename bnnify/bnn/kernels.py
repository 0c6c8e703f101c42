"""Elementwise kernels of a training step over a flat store, compiled where possible.

Each kernel is a plain torch function over equal-length chunks (flat slices of a
store). `run` calls its `torch.compile` (inductor) version, one fused loop per
call, when compiling is possible, and the function itself otherwise: same maths,
more memory passes. The noise is either a chunk of standard normals or, for the
shifted noise of `bnnify.bnn.noise`, a chunk of the reused pool with the step's
signs, computed inside the kernel (`noise` is then `(pool_chunk, first_index,
seed)`).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bnnify.bnn.noise import signs

__all__ = [
    "COMPILE_ENV",
    "MIN_COMPILED_CHUNK",
    "compile_refusal",
    "compiled_dtypes",
    "environment",
    "grads",
    "kl",
    "kl_grads",
    "note_once",
    "run",
    "sample",
    "sample_kl",
]

logger = logging.getLogger("bnnify")

COMPILE_ENV = "BNNIFY_COMPILE"
# Chunks shorter than this run eagerly: sizes 0 and 1 would each cost a graph of
# their own (torch.compile specializes them), and such chunks cost nothing anyway.
MIN_COMPILED_CHUNK = 16


def _eps(noise: tuple[Tensor, ...]) -> Tensor:
    if len(noise) == 1:
        return noise[0]
    pool, first, seed = noise
    return pool * signs(first, seed, pool.shape[0], pool.dtype)


def sample(mu: Tensor, rho: Tensor, noise: tuple[Tensor, ...], out: Tensor) -> None:
    """Writes `mu + softplus(rho) * eps` into `out`."""
    out.copy_(mu + F.softplus(rho) * _eps(noise))


def sample_kl(
    mu: Tensor, rho: Tensor, noise: tuple[Tensor, ...], out: Tensor, prior: Tensor
) -> Tensor:
    """Writes the sample into `out`; returns the chunk's KL to N(m, s^2), less its constant.

    `prior` holds `(m, 1 / s^2)`. The returned float64 sum is
    `sum((mu - m)^2 + sigma^2) / (2 s^2) - sum(log sigma)`; the caller adds
    `n (log s - 1/2)`.
    """
    sigma = F.softplus(rho)
    out.copy_(mu + sigma * _eps(noise))
    d = mu - prior[0]
    terms = 0.5 * (d * d + sigma * sigma) * prior[1] - torch.log(sigma)
    return terms.sum(dtype=torch.float64)


def grads(
    grad: Tensor,
    mu: Tensor,
    rho: Tensor,
    noise: tuple[Tensor, ...],
    coef: Tensor,
    out_mu: Tensor,
    out_rho: Tensor,
) -> None:
    """Gradients of mu and rho from the sample's gradient `grad` and the KL's.

    `coef` holds `(g / s^2, g, m)` with `g` the gradient of the KL (zeros when the
    KL is not part of this step): d KL / d mu = (mu - m) / s^2 and
    d KL / d rho = (sigma / s^2 - 1 / sigma) sigmoid(rho).
    """
    # softplus and sigmoid from one exponential, exp(-|rho|), which cannot overflow.
    t = torch.exp(-rho.abs())
    sigma = torch.where(rho > 20, rho, torch.relu(rho) + torch.log1p(t))  # F.softplus
    sigmoid = torch.where(rho >= 0, 1.0, t) / (1 + t)
    out_mu.copy_(grad + coef[0] * (mu - coef[2]))
    out_rho.copy_((grad * _eps(noise) + coef[0] * sigma - coef[1] / sigma) * sigmoid)


def kl(mu: Tensor, rho: Tensor, prior: Tensor) -> Tensor:
    """The chunk's KL to N(m, s^2) less its constant, as in `sample_kl`, without a sample."""
    sigma = F.softplus(rho)
    d = mu - prior[0]
    terms = 0.5 * (d * d + sigma * sigma) * prior[1] - torch.log(sigma)
    return terms.sum(dtype=torch.float64)


def kl_grads(mu: Tensor, rho: Tensor, coef: Tensor, out_mu: Tensor, out_rho: Tensor) -> None:
    """The gradients of the KL alone (`coef` as in `grads`)."""
    t = torch.exp(-rho.abs())
    sigma = torch.where(rho > 20, rho, torch.relu(rho) + torch.log1p(t))
    sigmoid = torch.where(rho >= 0, 1.0, t) / (1 + t)
    out_mu.copy_(coef[0] * (mu - coef[2]))
    out_rho.copy_((coef[0] * sigma - coef[1] / sigma) * sigmoid)


_compiled: dict[Callable, Callable] = {}
_failure: str | None = None
_noted: set[str] = set()


def compiled_dtypes() -> tuple[torch.dtype, ...]:
    """Dtypes the compiled kernels serve (half precisions stay on the eager kernels)."""
    return (torch.float32, torch.float64)


def note_once(message: str, *args: Any) -> None:
    """Logs `message` at debug level on the "bnnify" logger, once per process."""
    text = message % args if args else message
    if text not in _noted:
        _noted.add(text)
        logger.debug(text)


_ENVIRONMENT = ("BNNIFY_COMPILE", "TORCHDYNAMO_DISABLE", "TORCH_COMPILE_DISABLE", "CXX")


def environment() -> tuple:
    """What `compile_refusal` reads, to tell when its answer may have changed."""
    return (*(os.environ.get(name) for name in _ENVIRONMENT), _failure)


@functools.cache
def _which(program: str) -> str | None:
    return shutil.which(program)


def compile_refusal(device: torch.device) -> str | None:
    """Why the kernels cannot be compiled for `device` in this process, or None."""
    if os.environ.get(COMPILE_ENV, "").strip() == "0":
        return f"{COMPILE_ENV}=0"
    for name in ("TORCHDYNAMO_DISABLE", "TORCH_COMPILE_DISABLE"):
        if os.environ.get(name, "") == "1":
            return f"{name}=1"
    if _failure is not None:
        return _failure
    if device.type != "cpu":
        return f"the compiled step is built for the CPU only, not {device.type}"
    compiler = os.environ.get("CXX") or {"darwin": "clang++", "win32": "cl"}.get(
        sys.platform, "g++"
    )
    if _which(compiler) is None:
        return f"no C++ compiler found ({compiler!r}, the CXX environment variable)"
    return None


def run(kernel: Callable, *args: Any) -> Any:
    """`kernel(*args)`, compiled unless compiling failed once in this process.

    A failure to compile (a compiler error, an unsupported platform) is logged at
    debug level and switches this process to the eager kernels; the call itself
    is then computed eagerly, so its result is never lost.
    """
    global _failure
    if _failure is not None or args[0].numel() < MIN_COMPILED_CHUNK:
        return kernel(*args)
    compiled = _compiled.get(kernel)
    if compiled is None:
        compiled = _compiled[kernel] = torch.compile(kernel, dynamic=True, fullgraph=True)
    start = time.perf_counter()
    try:
        result = compiled(*args)
    except Exception as error:  # torch.compile's failures have no common base class
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        _failure = f"torch.compile failed ({type(error).__name__}: {first})"
        note_once("eager training kernels from now on: %s", _failure)
        return kernel(*args)
    seconds = time.perf_counter() - start
    if seconds > 0.5:
        note_once(
            "compiled the %s kernel for %s in %.1f s",
            kernel.__name__,
            str(args[0].dtype).removeprefix("torch."),
            seconds,
        )
    return result
