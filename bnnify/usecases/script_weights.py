"""Installing sampled weights into TorchScript modules, and proving that they reach the output.

A TorchScript module cannot be reparametrized in place: weights are sampled outside it
and installed as new tensors wherever its code reads a Bayesian parameter. That is not
only the parameter's attribute: a scripted `nn.LSTM`, `nn.GRU` or `nn.RNN` reads
`_flat_weights`, a list holding the same tensors, and a user's module may keep a
parameter in a buffer or a list too. Such places are found among the parameters and
buffers of every submodule and among the attributes that the inlined `forward` graph
reads, by sharing memory with the parameter. Two kinds of place cannot take a sample
soundly and are refused: a view of a parameter with another shape or offset, and a copy
(equal values, other memory). A cache computed from a parameter cannot be recognized;
`ScriptWeights.check_reach` catches it, as anything else that would leave a sampled
weight unused, by checking once that the output depends on every installed weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bnnify.bnn.reach import refuse_unreached
from bnnify.errors import InputError

__all__ = ["ScriptWeights"]

_FIX = (
    "Convert the model as a torch.export program (.pt2) or as a state dict with `arch:` "
    "instead: there bnnify samples the weights inside the module."
)

# A position inside an attribute: () for a tensor, indices and keys into lists, tuples, dicts.
Position = tuple[Any, ...]


@dataclass
class _Place:
    """An attribute of a scripted (sub)module holding tensors: one, or a container of them."""

    owner: Any
    attr: str
    where: str
    is_parameter: bool
    read: bool  # by `forward`, or perhaps (when its graph cannot be followed everywhere)
    found: dict[Position, int] = field(default_factory=dict)  # position -> parameter index


class ScriptWeights:
    """Where a TorchScript module reads each Bayesian parameter, and how to replace it.

    Args:
        script: The TorchScript module, as loaded (before moving it to a device).
        names: The Bayesian parameters (tied ones once), in the order of `install`.

    Raises:
        InputError: If the module has no parameter of one of `names`, or keeps a view
            or a copy of a Bayesian parameter, where a sample cannot be installed.
    """

    def __init__(self, script: torch.jit.ScriptModule, names: Sequence[str]):
        self.names = list(names)
        params = dict(script.named_parameters())
        for name in self.names:
            if name not in params:
                raise InputError(
                    f"the TorchScript model has no parameter {name!r} recorded in the checkpoint",
                    hint="Pass the model file the checkpoint was converted from.",
                )
        matcher = _Matcher([params[name] for name in self.names], self.names)
        self._places = [p for p in _places(script) if _locate(p, matcher)]

    def install(self, weights: Sequence[Tensor]) -> list[nn.Parameter]:
        """Installs `weights` (in the order of `names`) as new leaf parameters; returns them."""
        leaves = [nn.Parameter(w.detach(), requires_grad=w.requires_grad) for w in weights]
        assert len(leaves) == len(self.names)
        for place in self._places:
            if () in place.found:
                setattr(place.owner, place.attr, leaves[place.found[()]])
            else:
                # Read back each time: the other entries follow `.to()` and loaded state.
                current = getattr(place.owner, place.attr)
                setattr(place.owner, place.attr, _rebuild(current, place.found, leaves, ()))
        return leaves

    def check_reach(self, run: Callable[[], Any], weights: Sequence[Tensor]) -> None:
        """Refuses unless the output of `run()` depends on every weight `install` puts in.

        One forward and one backward pass on whatever `run` computes (keep it small),
        by `bnnify.bnn.reach.refuse_unreached`.

        Raises:
            InputError: Naming the parameters that do not reach the output.
        """
        with torch.inference_mode(False), torch.enable_grad():
            leaves = self.install([w.detach().clone().requires_grad_() for w in weights])
            output = run()
        refuse_unreached(output, leaves, self.names, model="the TorchScript model", fix=_FIX)


class _Matcher:
    """Tells whether a tensor is a Bayesian parameter, a view or a copy of one."""

    def __init__(self, params: list[Tensor], names: list[str]):
        self.names = names
        self.by_storage: dict[int, list[int]] = {}
        self.by_shape: dict[tuple, list[int]] = {}
        self.params = params
        for index, param in enumerate(params):
            if param.numel() == 0:
                continue
            self.by_storage.setdefault(_storage(param), []).append(index)
            if not _constant(param):
                self.by_shape.setdefault((param.shape, param.dtype), []).append(index)

    def same(self, tensor: Tensor) -> int | None:
        """The parameter `tensor` is (same memory, shape and strides), if any."""
        for index in self.by_storage.get(_storage(tensor), []):
            if _same_view(tensor, self.params[index]):
                return index
        return None

    def refuse_view_or_copy(self, tensor: Tensor, where: str, is_parameter: bool) -> None:
        for index in self.by_storage.get(_storage(tensor), []):
            if _overlap(tensor, self.params[index]):
                self._refuse(where, index, "a view of it with another shape or offset")
        if is_parameter:
            return  # an untied parameter may equal another by value: it is its own weight
        for index in self.by_shape.get((tensor.shape, tensor.dtype), []):
            if tensor.device == self.params[index].device and torch.equal(
                tensor, self.params[index]
            ):
                self._refuse(where, index, "a copy of it")

    def _refuse(self, where: str, index: int, what: str) -> None:
        raise InputError(
            f"the TorchScript model keeps the Bayesian parameter {self.names[index]!r} in "
            f"{where!r}, {what}: a sampled weight cannot be installed there, so the model "
            "would run with the trained weight",
            hint=f"{_FIX} Or keep the parameter deterministic with --exclude "
            f"{self.names[index]!r}.",
        )


def _locate(place: _Place, matcher: _Matcher) -> bool:
    """Records in `place` the Bayesian parameters it holds; True if any."""
    value = getattr(place.owner, place.attr)
    for position, tensor in _positions(value, ()):
        if tensor.numel() == 0:
            continue
        index = matcher.same(tensor)
        if index is None and place.read:
            where = place.where + "".join(f"[{key!r}]" for key in position)
            matcher.refuse_view_or_copy(tensor, where, place.is_parameter)
        elif index is not None:
            place.found[position] = index
    return bool(place.found)


def _places(script: nn.Module) -> list[_Place]:
    """The parameters and buffers of every submodule, and the other attributes `forward` reads."""
    read, complete = _attributes_read(script)
    places: dict[tuple[int, str], _Place] = {}

    def add(owner: Any, path: tuple[str, ...], is_parameter: bool) -> None:
        place = places.setdefault(
            (id(owner), path[-1]), _Place(owner, path[-1], ".".join(path), is_parameter, False)
        )
        place.read = place.read or not complete or path in read

    for prefix, module in script.named_modules(remove_duplicate=False):
        base = tuple(prefix.split(".")) if prefix else ()
        for attr, _ in module.named_parameters(recurse=False):
            add(module, (*base, attr), True)
        for attr, _ in module.named_buffers(recurse=False):
            add(module, (*base, attr), False)
    for path in read:
        owner = script
        for attr in path[:-1]:
            owner = getattr(owner, attr)
        if not isinstance(getattr(owner, path[-1]), nn.Module):
            add(owner, path, False)
    return list(places.values())


def _attributes_read(script: torch.jit.ScriptModule) -> tuple[set[tuple[str, ...]], bool]:
    """Attribute paths from the module that its `forward` reads, every call inlined.

    Returns:
        The paths, and whether they are all: False when a call could not be inlined
        (a method called through an interface type), whose reads are unknown.
    """
    graph = script.inlined_graph
    inputs = list(graph.inputs())
    paths: dict[int, tuple[str, ...]] = {inputs[0].unique(): ()} if inputs else {}
    found: set[tuple[str, ...]] = set()
    complete = True

    def walk(block: Any) -> None:
        nonlocal complete
        for node in block.nodes():
            complete = complete and node.kind() != "prim::CallMethod"
            if node.kind() == "prim::GetAttr":
                parent = paths.get(node.input().unique())
                if parent is not None:
                    path = (*parent, node.s("name"))
                    paths[node.output().unique()] = path
                    found.add(path)
            for inner in node.blocks():
                walk(inner)

    walk(graph)
    return found, complete


def _positions(value: Any, position: Position) -> Iterator[tuple[Position, Tensor]]:
    """Every tensor in `value` (a tensor, or lists, tuples and dicts of them) by position."""
    if isinstance(value, Tensor):
        yield position, value
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _positions(item, (*position, index))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _positions(item, (*position, key))


def _rebuild(value: Any, found: dict[Position, int], leaves: list, position: Position) -> Any:
    """`value` with the tensor at each position of `found` replaced by its leaf."""
    if position in found:
        return leaves[found[position]]
    if isinstance(value, (list, tuple)):
        items = [_rebuild(v, found, leaves, (*position, i)) for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: _rebuild(v, found, leaves, (*position, k)) for k, v in value.items()}
    return value


def _storage(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.device == b.device
    )


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Whether the memory spans of two tensors of one storage intersect."""

    def span(t: Tensor) -> tuple[int, int]:
        extent = sum((size - 1) * abs(step) for size, step in zip(t.shape, t.stride(), strict=True))
        return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _constant(tensor: Tensor) -> bool:
    """All elements equal (a fresh bias, a scalar): an equal buffer may be a coincidence."""
    flat = tensor.detach().reshape(-1)
    return bool((flat == flat[0]).all())
