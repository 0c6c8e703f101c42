"""Standard normal noise for flat stores: threaded fills, reused buffers, shifted reuse."""

from __future__ import annotations

import math
import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

__all__ = [
    "Lease",
    "NoisePool",
    "ShiftedNoise",
    "signs",
    "standard_normal",
]

# Large CPU noise tensors are filled in this many independently seeded pieces, in
# parallel: torch's CPU generator is sequential, and noise dominates a CPU step.
_NOISE_PIECES = 4
_NOISE_MIN = 1 << 20
_pool: ThreadPoolExecutor | None = None


def _reset_pool() -> None:
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool)


def standard_normal(
    numel: int, dtype: torch.dtype, device: torch.device, out: Tensor | None = None
) -> Tensor:
    """`numel` standard normal numbers, drawn from torch's global generator's seed.

    On the CPU, large requests are split into pieces with their own generators,
    seeded from the global generator, and filled by a thread pool. The result is
    reproducible under `torch.manual_seed` and independent of the thread count.
    `out`, if given, is filled instead of a new tensor (same numbers).
    """
    global _pool
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=device)
    threads = min(torch.get_num_threads(), _NOISE_PIECES)
    if out.device.type != "cpu" or numel < _NOISE_MIN or torch.compiler.is_compiling():
        return out.normal_()
    seeds = torch.randint(0, 2**62, (_NOISE_PIECES,)).tolist()
    size = math.ceil(numel / _NOISE_PIECES)

    def fill(i: int) -> None:
        generator = torch.Generator().manual_seed(seeds[i])
        out[i * size : (i + 1) * size].normal_(generator=generator)

    if threads < 2:
        for i in range(_NOISE_PIECES):
            fill(i)
        return out
    if _pool is None:
        _pool = ThreadPoolExecutor(_NOISE_PIECES, thread_name_prefix="bnnify-noise")
    list(_pool.map(fill, range(_NOISE_PIECES)))
    return out


_MASK32 = 0xFFFFFFFF


def signs(first: Tensor, seed: Tensor, numel: int, dtype: torch.dtype) -> Tensor:
    """+-1 for store elements `first, ..., first + numel - 1`, from a hash of (index, seed).

    A 32-bit integer hash (multiply-xorshift rounds, constants below 2**31 so that
    no int64 product overflows): written in torch ops, it runs inside a compiled
    kernel with no random number generator and no memory traffic.
    """
    x = (torch.arange(numel, device=first.device) + first) & _MASK32
    x = ((x ^ seed) * 0x2C1B3C6D) & _MASK32
    x = ((x ^ (x >> 16)) * 0x297A2D39) & _MASK32
    x = ((x ^ (x >> 15)) * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 16)
    return 1 - 2 * ((x >> 11) & 1).to(dtype)


class Lease:
    """A noise buffer lent until `release()` or garbage collection (then given back to
    `pool`, a `NoisePool`, if any)."""

    def __init__(self, pool: NoisePool | None, tensor: Tensor):
        self.tensor = tensor
        give_back = pool._give_back if pool is not None else _keep
        self._finalizer = weakref.finalize(self, give_back, tensor)

    @property
    def out(self) -> bool:
        """Whether the buffer is still lent."""
        return self._finalizer.alive

    def release(self) -> None:
        self._finalizer()
        self.tensor = None


def _keep(tensor: Tensor) -> None:
    """The end of a lease on a buffer that stays where it is."""


class NoisePool:
    """Reused noise buffers: refilling one costs no page faults, unlike a fresh tensor.

    A buffer is lent (`draw`) to one weight sample until that sample's backward
    pass releases it, or until the sample's graph is freed; two samples alive at
    once (several forward passes before one backward pass) get two buffers.
    """

    _KEEP = 2

    def __init__(self) -> None:
        self._free: list[Tensor] = []

    def draw(self, numel: int, dtype: torch.dtype, device: torch.device) -> Lease:
        """A lent buffer filled with `standard_normal(numel, dtype, device)`."""
        buffer = None
        while self._free and buffer is None:
            candidate = self._free.pop()
            if (candidate.numel(), candidate.dtype, candidate.device) == (numel, dtype, device):
                buffer = candidate
        if buffer is None:
            # A normal tensor even under inference_mode: it is refilled outside it later.
            with torch.inference_mode(False):
                buffer = torch.empty(numel, dtype=dtype, device=device)
        standard_normal(numel, dtype, device, out=buffer)
        return Lease(self, buffer)

    def clear(self) -> None:
        self._free.clear()

    def _give_back(self, tensor: Tensor) -> None:
        if len(self._free) < self._KEEP:
            self._free.append(tensor)


class ShiftedNoise:
    """Cheap noise: one buffer of normals, cyclically shifted and sign-flipped per step.

    The buffer `pool` (at least `numel` standard normals) is read at every step
    from a fresh uniform random offset, wrapping around, and every element gets a
    fresh random sign: `eps[i] = sign(i, seed) * pool[(i + offset) mod len(pool)]`.
    Any fixed shift and signs of independent standard normals are independent
    standard normals, so each step's noise is exactly N(0, I) and each step's
    gradient estimate unbiased. What is lost is independence between steps: they
    share the magnitudes |pool|. To bound that, each step first redraws the next
    1/`REFRESH` of the pool (when no sample still needs the pool for its backward
    pass), so the whole pool is new every `REFRESH` steps, and a pool's own
    deviation from N(0, 1) does not follow the whole run.
    """

    MIN_POOL = 1 << 20
    REFRESH = 32

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        self.numel = numel
        size = max(numel, self.MIN_POOL)
        self.pool = standard_normal(size, dtype, device)
        self.refreshed = 0
        self._lent: weakref.WeakSet[Lease] = weakref.WeakSet()

    def matches(self, numel: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (self.numel, self.pool.dtype, self.pool.device) == (numel, dtype, device)

    def step(self) -> tuple[int, int, Lease]:
        """A fresh `(offset, seed)` from torch's global generator, and a lease on the pool.

        The pool is not refreshed while a lease is out: a backward pass still to
        come recomputes its noise from the pool (autograd also checks that the pool
        was not changed since, by its version).
        """
        if not any(lease.out for lease in self._lent):
            size = self.pool.numel()
            part = self.refreshed % self.REFRESH
            a, b = part * size // self.REFRESH, (part + 1) * size // self.REFRESH
            standard_normal(b - a, self.pool.dtype, self.pool.device, out=self.pool[a:b])
            self.refreshed += 1
        offset, seed = torch.randint(0, 2**32, (2,)).tolist()
        lease = Lease(None, self.pool)
        self._lent.add(lease)
        return offset % self.pool.numel(), seed, lease

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_lent"] = weakref.WeakSet()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def pieces(self, start: int, end: int, offset: int) -> list[tuple[int, int, int]]:
        """`(start, end, pool_start)` pieces of store elements `[start, end)`: at most two."""
        size = self.pool.numel()
        first = (start + offset) % size
        if first + end - start <= size:
            return [(start, end, first)]
        split = start + size - first
        return [(start, split, first), (split, end, 0)]

    def eps(self, start: int, end: int, offset: int, seed: int) -> Tensor:
        """The noise of store elements `[start, end)` at the step `(offset, seed)`, eagerly."""
        parts = []
        for a, b, p in self.pieces(start, end, offset):
            first = torch.tensor(a, device=self.pool.device)
            sign = signs(first, torch.tensor(seed, device=self.pool.device), b - a, self.pool.dtype)
            parts.append(self.pool[p : p + b - a] * sign)
        return torch.cat(parts)
