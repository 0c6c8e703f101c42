"""Per-tensor seeding, so that results do not depend on the order tensors are visited."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["seeded"]


@contextmanager
def seeded(seed: int, name: str, device: torch.device | str = "cpu") -> Iterator[None]:
    """Seeds torch from `(seed, name)` inside the block and restores the RNG afterwards."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        value = int.from_bytes(digest[:8], "little") & (2**63 - 1)
        # Only the generators forked above: torch.manual_seed would also queue a seed for
        # every lazily initialized backend, recording a stack trace each time (ms per call).
        torch.random.default_generator.manual_seed(value)
        for cuda in devices:
            with torch.cuda.device(cuda):
                torch.cuda.manual_seed(value)
        yield
