"""What a model file says of each tensor (name, dtype, shape, role), and tensors held eagerly."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bnnify.formats.ties import alias_key

__all__ = ["Loaded", "TensorMeta", "eager_tensors"]

logger = logging.getLogger("bnnify")


@dataclass(frozen=True)
class TensorMeta:
    """Name, dtype, shape and role of one tensor of a model file.

    `kind` is "parameter" or "buffer" where the file says so (TorchScript, torch.export,
    a trusted pickled module), else "unknown" (state dicts and safetensors files).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: str

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass
class Loaded:
    """What a format's loader found: the module (if any), tensors by name, how to read them.

    Attributes:
        format: The `ModelFormat` found.
        module: The program or module the file holds, or None.
        metas: Each tensor's metadata, in the file's order.
        fetch: Reads tensor `name`.
        close: Releases open files, or None.
        key: Where in a checkpoint dict the state dict was (a dotted path), or None.
        prefix: The wrapper prefix removed from every name, or None.
    """

    format: Any
    module: Any
    metas: dict[str, TensorMeta]
    fetch: Callable[[str], Tensor]
    close: Callable[[], None] | None = None
    key: str | None = None
    prefix: str | None = None


def eager_tensors(
    entries: list[tuple[str, Tensor, str]], dedup: bool = True
) -> tuple[dict[str, Tensor], dict[str, TensorMeta]]:
    """Detached tensors and their metadata; with `dedup`, aliases of a tensor once."""
    tensors: dict[str, Tensor] = {}
    metas: dict[str, TensorMeta] = {}
    seen: set[tuple] = set()
    for name, tensor, kind in entries:
        key = alias_key(tensor)
        if dedup and key is not None and key in seen:
            logger.debug("%s is tied to an earlier tensor: listed once", name)
            continue
        seen.add(key)
        tensors[name] = tensor.detach()
        metas[name] = TensorMeta(name, tensor.dtype, tuple(tensor.shape), kind)
    return tensors, metas
