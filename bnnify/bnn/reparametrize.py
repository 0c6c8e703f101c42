"""In-place reparametrization: a parameter attribute becomes a sampled tensor.

Like `torch.nn.utils.parametrize`, the module's class is swapped for a subclass
with a property per reparametrized name. We do not register through `parametrize`
itself: it keeps each original tensor as an `nn.Parameter` (memory, and a stale
trainable tensor in `parameters()`), and its multi-tensor `right_inverse` registers
one parameter per tensor, which cannot be views of a flat store.

The property reads the current *draw*. Inside `BayesianModule.forward` one draw
serves the whole pass: each flat store is sampled by one kernel on first use, and
every read of a parameter, tied parameters included, sees the same sample. Outside
a forward pass each read samples that parameter alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnnify.bnn.posteriors import VariationalPosterior
from bnnify.bnn.store import GaussianStore
from bnnify.errors import UsageError

__all__ = ["Draw", "Sampler", "Slot", "install_", "is_reparametrized"]

_CLASSES: dict[tuple[type, frozenset[str]], type] = {}


class Slot:
    """One reparametrized parameter: where its posterior lives and who uses it.

    Attributes:
        name: The parameter's name in the wrapped module (first of its aliases).
        aliases: Every name under which the (tied) parameter appears.
        owners: `(module, attribute)` pairs that read it.
        store: Index of its flat `GaussianStore`, or None for a standalone posterior.
        index: Its slot in the store, or its key among the standalone posteriors.
    """

    __slots__ = ("aliases", "index", "name", "owners", "sampler", "shape", "store")

    def __init__(self, name: str, aliases: list[str], shape: torch.Size, sampler: Sampler):
        self.name = name
        self.aliases = aliases
        self.shape = shape
        self.sampler = sampler
        self.owners: list[tuple[nn.Module, str]] = []
        self.store: int | None = None
        self.index: Any = None

    def value(self) -> Tensor:
        draw = self.sampler.draw
        if draw is None:
            return self.sampler.lone_value(self)
        return draw.value(self)


def _property(name: str) -> property:
    def getter(module: nn.Module) -> Tensor:
        return module.__dict__["_bnnify_slots"][name].value()

    def setter(module: nn.Module, value: Any) -> None:
        raise AttributeError(
            f"{name!r} of {type(module).__bases__[0].__name__} is reparametrized by bnnify "
            "and cannot be assigned; change its posterior's variational parameters instead"
        )

    return property(getter, setter, doc=f"Reparametrized {name!r}: a sample of its posterior.")


def _rebuild(base: type, names: tuple[str, ...]) -> nn.Module:
    cls = _bayesian_class(base, frozenset(names))
    return cls.__new__(cls)


def _reduce_ex(self: nn.Module, protocol: int) -> tuple:
    names = tuple(sorted(self._bnnify_names))
    return _rebuild, (self._bnnify_base, names), self.__dict__


def _linear_forward(self: nn.Linear, input: Tensor) -> Tensor:
    lrt = self.__dict__.get("_bnnify_lrt")
    if lrt is not None:
        output = lrt[0].sampler.local_linear(self, input, lrt)
        if output is not None:
            return output
    return F.linear(input, self.weight, self.bias)


def _bayesian_class(base: type, names: frozenset[str]) -> type:
    key = (base, names)
    if key not in _CLASSES:
        namespace: dict[str, Any] = {name: _property(name) for name in sorted(names)}
        namespace.update(
            _bnnify_base=base,
            _bnnify_names=names,
            __reduce_ex__=_reduce_ex,
            __module__=base.__module__,
            __qualname__=base.__qualname__,
        )
        if base is nn.Linear:
            namespace["forward"] = _linear_forward
        _CLASSES[key] = type(base.__name__, (base,), namespace)
    return _CLASSES[key]


def install_(module: nn.Module, name: str, slot: Slot) -> None:
    """Replaces parameter `name` of `module`, in place, by a property reading `slot`."""
    if isinstance(module, torch.jit.ScriptModule):
        raise UsageError(
            f"cannot reparametrize {name!r} of a TorchScript module in place",
            hint="Convert TorchScript files with `bnnify convert` (bnnify.convert in Python).",
        )
    del module._parameters[name]
    base = getattr(type(module), "_bnnify_base", type(module))
    names = frozenset(getattr(type(module), "_bnnify_names", frozenset()) | {name})
    slots = module.__dict__.setdefault("_bnnify_slots", {})
    slots[name] = slot
    module.__class__ = _bayesian_class(base, names)
    slot.owners.append((module, name))


def is_reparametrized(module: nn.Module, name: str | None = None) -> bool:
    """Whether `module` has reparametrized attributes (or the attribute `name`)."""
    names = getattr(type(module), "_bnnify_names", frozenset())
    return bool(names) if name is None else name in names


class Sampler:
    """Resolves slot values: the current draw, the sampling mode, frozen noise.

    Args:
        stores: The flat Gaussian stores (an `nn.ModuleList` of `GaussianStore`).
        posteriors: Standalone posteriors by key (an `nn.ModuleDict`).
        lrt_ends: Per store, the end of its leading range of slots eligible for the
            local reparameterization trick.
    """

    def __init__(self, stores: nn.ModuleList, posteriors: nn.ModuleDict, lrt_ends: list[int]):
        self.stores = stores
        self.posteriors = posteriors
        self.lrt_ends = lrt_ends
        self.mode = "sample"
        self.local = False
        self.frozen: dict[str, Any] | None = None
        # id(slot) -> the tensor every read returns (`BayesianModule.given_weights`).
        self.given: dict[int, Tensor] | None = None
        self.draw: Draw | None = None
        # Per store, its compiled sampler (`bnnify.bnn.fused`), set by BayesianModule.
        self.fused: list[Any] = []

    def store_of(self, slot: Slot) -> GaussianStore:
        return self.stores[slot.store]

    def begin(self) -> Draw | None:
        """Opens a draw unless one is open; returns it if it was opened here."""
        if self.draw is not None:
            return None
        self.draw = Draw(self)
        return self.draw

    def end(self, draw: Draw | None) -> None:
        if draw is not None and self.draw is draw:
            self.draw = None

    def lone_value(self, slot: Slot) -> Tensor:
        """A value for one slot read outside any forward pass."""
        if self.given is not None and id(slot) in self.given:
            return self.given[id(slot)]
        if slot.store is None:
            return self._posterior_value(slot)
        store = self.store_of(slot)
        if self.mode == "mean":
            return store.view(store.mu, slot.index)
        start, end = store.span(slot.index)
        eps = None if self.frozen is None else self.frozen["eps"][slot.store][start:end]
        return store.sample(start, end, eps).view(slot.shape)

    def _posterior_value(self, slot: Slot) -> Tensor:
        posterior: VariationalPosterior = self.posteriors[slot.index]
        if self.mode == "mean":
            return posterior.mean
        if self.frozen is None:
            return posterior.sample_parameters()
        device = _device(posterior)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.frozen["seeds"][slot.index])
            return posterior.sample_parameters()

    def freeze(self) -> dict[str, Any]:
        """Draws the noise that a frozen sample reuses in every forward pass."""
        eps = [store.noise() for store in self.stores]
        seeds = {key: int(torch.randint(0, 2**62, ())) for key in self.posteriors}
        return {"eps": eps, "seeds": seeds}

    def repeated_pass(
        self, module: nn.Module, inputs: Sequence[Tensor], copies: int
    ) -> Tensor | None:
        """`copies` outputs of `module` from one local-trick pass over repeated inputs.

        Stacked on a new first dimension; None if a weight had to be sampled after all
        (a Linear fed a non-2-D input), whose samples would be shared across copies.
        """
        repeated = [x.repeat(copies, *([1] * (x.dim() - 1))) for x in inputs]
        previous, self.local = self.local, True
        draw = self.begin()
        if draw is not None:
            draw.repeated = {id(r): (x, copies) for r, x in zip(repeated, inputs, strict=True)}
        try:
            output = module(*repeated)
        finally:
            self.end(draw)
            self.local = previous
        if draw is None or draw.values or draw.flat:
            return None
        return output.reshape(copies, -1, *output.shape[1:])

    def local_linear(self, module: nn.Linear, input: Tensor, lrt: tuple) -> Tensor | None:
        """The output of `module` by local reparameterization, or None to sample weights."""
        draw = self.draw
        if draw is None or not self.local or self.mode != "sample" or self.frozen is not None:
            return None
        if self.given is not None:
            return None  # the given weights, whichever layer they belong to
        if input.dim() > 2:
            return None
        return draw.local_linear(module, input, lrt)


def _device(posterior: nn.Module) -> torch.device:
    for tensor in posterior.parameters():
        return tensor.device
    return torch.device("cpu")


class Draw:
    """The weights of one forward pass: each store sampled at most once, lazily."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.values: dict[int, Tensor] = dict(sampler.given or {})
        self.flat: dict[int, list[Tensor]] = {}
        self.local: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        self.local_used: set[int] = set()
        # id(input repeated S times along dim 0) -> (the input, S): set by predict_samples.
        self.repeated: dict[int, tuple[Tensor, int]] = {}

    def value(self, slot: Slot) -> Tensor:
        key = id(slot)
        value = self.values.get(key)
        if value is None:
            value = self._compute(slot)
            self.values[key] = value
        return value

    def _compute(self, slot: Slot) -> Tensor:
        sampler = self.sampler
        if slot.store is None:
            return sampler.lone_value(slot)
        store = sampler.store_of(slot)
        first = 0
        if sampler.local and sampler.mode == "sample" and sampler.frozen is None:
            first = self._first_sampled(slot.store)
            if slot.index < first:
                # A local-trick Linear called on a non-2-D input: sample its weights alone.
                return sampler.lone_value(slot)
        parts = self.flat.get(slot.store)
        if parts is None:
            fused = self._fused(slot.store, first)
            if fused is not None:
                parts = fused.sample()
            else:
                parts = store.split(self._flat(slot.store, store, first), first)
            self.flat[slot.store] = parts
        return parts[slot.index - first]

    def _fused(self, store_index: int, first: int) -> Any:
        """The compiled sampler of a store sampled whole (no frozen noise), if active."""
        sampler = self.sampler
        if first or sampler.mode != "sample" or sampler.frozen is not None:
            return None
        fused = getattr(sampler, "fused", ())  # absent from modules pickled before it
        fused = fused[store_index] if store_index < len(fused) else None
        return fused if fused is not None and fused.active() else None

    def _first_sampled(self, store_index: int) -> int:
        return self.sampler.lrt_ends[store_index]

    def _flat(self, store_index: int, store: GaussianStore, first: int) -> Tensor:
        sampler = self.sampler
        if sampler.mode == "mean":
            return store.mu
        start = store.offsets[first]
        eps = None if sampler.frozen is None else sampler.frozen["eps"][store_index]
        return store.sample(start, store.numel, eps)

    def _local_parts(self, store_index: int) -> tuple[list[Tensor], list[Tensor]]:
        """Means and variances of the local-trick slots of a store, split once per draw."""
        parts = self.local.get(store_index)
        if parts is None:
            store = self.sampler.stores[store_index]
            last = self.sampler.lrt_ends[store_index]
            end = store.offsets[last]
            mu = store.mu if end == store.numel else store.mu[:end]
            # Half precision cannot hold small variances (its tiny is 6e-5): use float32.
            wide = torch.promote_types(mu.dtype, torch.float32)
            variance = store.sigma(0, end).to(wide).square()
            parts = (store.split(mu, 0, last), store.split(variance, 0, last))
            self.local[store_index] = parts
        return parts

    def local_linear(self, module: nn.Linear, input: Tensor, lrt: tuple) -> Tensor:
        weight_slot, bias_slot = lrt
        key = id(weight_slot)
        if key in self.values:
            return F.linear(input, self.values[key], module.bias)
        if key in self.local_used:
            raise UsageError(
                f"Linear layer {weight_slot.name.rsplit('.', 1)[0]!r} was called twice in one "
                "forward pass; the local reparameterization trick needs one call per pass",
                hint="Turn local_reparameterization off for models that reuse a layer.",
            )
        self.local_used.add(key)
        means, variances = self._local_parts(weight_slot.store)
        repeated = self.repeated.get(id(input))
        copies = 1
        if repeated is not None:
            # The same rows repeated: their mean and variance are computed once.
            input, copies = repeated
        bias = bias_slot is not None
        # A deterministic bias (not reparametrized) shifts the mean and adds no variance.
        bias_mean = means[bias_slot.index] if bias else module.bias
        mean = F.linear(input, means[weight_slot.index], bias_mean)
        var = F.linear(
            input.to(variances[0].dtype).square(),
            variances[weight_slot.index],
            variances[bias_slot.index] if bias else None,
        )
        # The floor keeps the gradient of sqrt finite where an input row is all zeros.
        std = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt().to(mean.dtype)
        if copies > 1:
            mean, std = mean.repeat(copies, 1), std.repeat(copies, 1)
        return torch.addcmul(mean, std, torch.randn_like(mean))
