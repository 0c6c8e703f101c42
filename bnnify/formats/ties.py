"""Tied tensors: one memory under several names (a shared embedding and output layer)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

__all__ = ["alias_key", "find_ties"]


def alias_key(tensor: Tensor) -> tuple | None:
    """Equal for two views of the same memory with the same layout (tied weights).

    None for a tensor without elements, which ties to nothing.
    """
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0 or tensor.numel() == 0:
        return None
    return (
        storage.data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
        tensor.device,
    )


def find_ties(tensors: Iterable[tuple[str, Tensor]]) -> dict[str, str]:
    """Each name whose tensor is tied to an earlier one -> the earlier one's name.

    The tensors must stay alive during the call: their memory addresses are compared.

    Example:
        >>> import torch
        >>> weight = torch.ones(2, 3)
        >>> find_ties([("emb.weight", weight), ("head.weight", weight), ("b", torch.ones(3))])
        {'head.weight': 'emb.weight'}
    """
    first: dict[tuple, str] = {}
    ties = {}
    for name, tensor in tensors:
        key = alias_key(tensor)
        if key is not None:
            owner = first.setdefault(key, name)
            if owner != name:
                ties[name] = owner
    return ties
