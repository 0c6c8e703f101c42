"""A `BayesianModule`'s reparametrized parameters: their storage, built, and their record."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn
from torch.distributions import Distribution

from bnnify.bnn.collect import Entry
from bnnify.bnn.posteriors import get_posterior, initialize_into
from bnnify.bnn.priors import Prior, get_prior
from bnnify.bnn.registry import Spec
from bnnify.bnn.reparametrize import Sampler, Slot, install_
from bnnify.bnn.store import GaussianStore
from bnnify.errors import ArgumentTypeError, BnnifyError, UsageError

__all__ = ["Reparametrized", "allocate_stores", "build_parameters", "check_module"]

logger = logging.getLogger("bnnify")


class Reparametrized(NamedTuple):
    """A reparametrized parameter: its names, shape, posterior (views of the storage), prior."""

    name: str
    aliases: tuple[str, ...]
    shape: torch.Size
    posterior: Distribution
    prior: Prior


def allocate_stores(entries: list[Entry], lrt: dict) -> tuple[list[GaussianStore], list[int]]:
    """Creates the flat stores and orders their slots, local-trick Linears first.

    Each entry learns its store and index; `entries` is sorted in storage order.

    Returns:
        The stores (one per dtype and device), and the number of local-trick slots
        leading each.
    """
    eligible = {id(e) for pair in lrt.values() for e in pair if e is not None}
    groups: dict[tuple, list[Entry]] = {}
    for entry in entries:
        groups.setdefault((entry.param.dtype, entry.param.device), []).append(entry)
    stores, lrt_ends = [], []
    for (dtype, device), group in groups.items():
        group.sort(key=lambda e: id(e) not in eligible)
        shapes = [e.param.shape for e in group]
        store = GaussianStore([e.name for e in group], shapes, dtype, device)
        for index, entry in enumerate(group):
            entry.store, entry.index = len(stores), index
        stores.append(store)
        lrt_ends.append(sum(id(e) in eligible for e in group))
    entries.sort(key=lambda e: (e.store, e.index))
    return stores, lrt_ends


def build_parameters(
    entries: list[Entry],
    specs: tuple[Spec, Spec],
    stores: nn.ModuleList,
    posteriors: nn.ModuleDict,
    sampler: Sampler,
    verbose: bool,
) -> tuple[list[Slot], list[Prior]]:
    """Builds each entry's posterior (in its store, or in `posteriors`) and prior.

    Only once every posterior and prior is built are the module's parameters replaced
    by their slots: a bad spec leaves the module untouched.

    Args:
        entries: The parameters to reparametrize, in storage order.
        specs: The parsed posterior and prior specs.
        stores: The flat stores of `allocate_stores`.
        posteriors: Receives the posteriors that are not stored flat.
        sampler: The sampler the slots draw from.
        verbose: Log each parameter (logger "bnnify") on stderr if nothing else would.

    Returns:
        The slots and the priors, in storage order.
    """
    posterior_spec, prior_spec = specs
    slots, priors = [], []
    with _verbose_logging(verbose):
        for entry in entries:
            param, entry.param = entry.param.detach(), None
            slot = Slot(entry.name, entry.aliases, param.shape, sampler)
            try:
                if entry.store is not None:
                    # Written straight into the flat storage: no parameter-sized copies.
                    store = stores[entry.store]
                    with torch.no_grad():
                        mu, rho = (store.view(t, entry.index) for t in (store.mu, store.rho))
                        initialize_into(posterior_spec, mu, rho, param)
                    slot.store, slot.index = entry.store, entry.index
                else:
                    slot.index = entry.name.replace(".", ":")
                    posteriors[slot.index] = get_posterior(posterior_spec, param)
                prior = get_prior(prior_spec, param)
            except BnnifyError as error:
                message = f"parameter {entry.name!r}: {error.message}"
                raise type(error)(message, hint=error.hint) from None
            priors.append(prior)
            entry.slot = slot
            slots.append(slot)
            logger.info(
                "reparametrized %s shape=%s elements=%d dtype=%s posterior=%s prior=%s",
                entry.name,
                tuple(param.shape),
                param.numel(),
                str(param.dtype).removeprefix("torch."),
                posterior_spec[0],
                prior_spec[0],
            )
            del param
        for entry in entries:
            for owner, attr in entry.owners:
                install_(owner, attr, entry.slot)
    return slots, priors


@contextmanager
def _verbose_logging(enabled: bool) -> Iterator[None]:
    """Shows INFO records of the "bnnify" logger on stderr when nothing else would."""
    if not enabled:
        yield
        return
    previous = logger.level
    logger.setLevel(logging.INFO)
    handler = None
    if not logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("bnnify: %(message)s"))
        logger.addHandler(handler)
    try:
        yield
    finally:
        logger.setLevel(previous)
        if handler is not None:
            logger.removeHandler(handler)


def check_module(module: object) -> None:
    """Refuses what `BayesianModule` cannot convert in place.

    Raises:
        ArgumentTypeError: If `module` is not an `nn.Module`.
        UsageError: If it is a TorchScript module.
    """
    if not isinstance(module, nn.Module):
        raise ArgumentTypeError(
            f"BayesianModule needs an nn.Module, got {type(module).__name__}",
            hint="Pass the model itself, e.g. BayesianModule(net).",
        )
    if isinstance(module, torch.jit.ScriptModule):
        raise UsageError(
            "a TorchScript module cannot be reparametrized in place",
            hint="Convert TorchScript files with `bnnify convert` (bnnify.convert in Python).",
        )
