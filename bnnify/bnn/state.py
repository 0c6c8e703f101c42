"""A Bayesian model's variational tensors by key: gathered as views, loaded in place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bnnify.bnn.keys import posterior_key, prior_key
from bnnify.errors import FormatError

__all__ = ["copy_state_", "gather_state"]


def gather_state(
    slots: Sequence[Any], stores: nn.ModuleList, posteriors: nn.ModuleDict, priors: nn.ModuleList
) -> dict[str, Tensor]:
    """The tensors of `BayesianModule.variational_state` (views of the storage)."""
    state: dict[str, Tensor] = {}
    for i, slot in enumerate(slots):
        if slot.store is None:
            for key, tensor in posteriors[slot.index].state_dict().items():
                state[posterior_key(slot.name, key)] = tensor
        else:
            store = stores[slot.store]
            state[posterior_key(slot.name, "mu")] = store.view(store.mu.detach(), slot.index)
            state[posterior_key(slot.name, "rho")] = store.view(store.rho.detach(), slot.index)
        for key, tensor in priors[i].named_buffers():
            if tensor.dim() > 0:
                state[prior_key(slot.name, key)] = tensor
    return state


@torch.no_grad()
def copy_state_(
    own: Mapping[str, Tensor], state: Mapping[str, Tensor], strict: bool
) -> tuple[list[str], list[str]]:
    """Copies the tensors of `state` into those of `own` of the same keys, in place.

    Returns:
        The `(missing, unexpected)` keys.

    Raises:
        FormatError: On a shape mismatch, or with `strict` on missing or
            unexpected keys.
    """
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise FormatError(
            f"variational state does not match: missing {missing[:5]}, unexpected {unexpected[:5]}",
            hint="Load a checkpoint made from the same model and spec.",
        )
    for key, target in own.items():
        if key in state:
            if tuple(state[key].shape) != tuple(target.shape):
                raise FormatError(
                    f"{key!r} has shape {tuple(state[key].shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(state[key])
    return missing, unexpected
