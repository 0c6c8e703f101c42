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
        torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        yield
