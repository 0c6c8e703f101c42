"""The per-example inputs of a model: named tensors that are batched together along dim 0."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from bnnify.errors import InputError, InvalidArgumentError, shorten

__all__ = ["Inputs", "as_inputs", "parse_input_keys"]


class Inputs:
    """The tensors a model takes per example, by name (in order), sliced together.

    Every tensor has the examples along dim 0; `inputs[i:j]` (or a tensor of indices)
    selects the same examples of each. The names are forward's argument names, or
    names that fill its first free arguments in order (see `usecases.model_call`).

    Args:
        tensors: One tensor (named `name`), or tensors by name.
        name: The name of a single tensor.

    Raises:
        InputError: For no tensor, a 0-dim tensor, or tensors with different numbers
            of examples.

    Example:
        >>> inputs = Inputs({"x": torch.zeros(5, 3), "mask": torch.ones(5, 7)})
        >>> len(inputs), inputs.names, inputs[1:3].shapes()
        (5, ['x', 'mask'], 'x (2, 3), mask (2, 7)')
    """

    def __init__(self, tensors: Tensor | Mapping[str, Tensor], name: str = "x"):
        self.tensors: dict[str, Tensor] = (
            {name: tensors} if isinstance(tensors, Tensor) else dict(tensors)
        )
        if not self.tensors:
            raise InputError("the model is given no input tensor")
        for key, tensor in self.tensors.items():
            if not isinstance(tensor, Tensor):
                raise InputError(f"input {key!r} is a {type(tensor).__name__}, not a tensor")
            if tensor.dim() == 0:
                raise InputError(
                    f"input {key!r} is a single number (shape ()), not one value per example",
                    hint="Pass a constant argument of forward with --model-arg NAME=VALUE.",
                )
        counts = {tensor.shape[0] for tensor in self.tensors.values()}
        if len(counts) > 1:
            raise InputError(
                f"the inputs have different numbers of examples: {self.shapes()}",
                hint="Every input tensor needs one entry per example along its first dimension.",
            )

    @property
    def names(self) -> list[str]:
        """The names, in order."""
        return list(self.tensors)

    def __len__(self) -> int:
        """The number of examples."""
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, index: slice | Tensor) -> Inputs:
        """The same examples of every tensor."""
        return self.map(lambda tensor: tensor[index])

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self.tensors.items())

    def sole(self, purpose: str) -> Tensor:
        """The one tensor, for `purpose` (e.g. "export checks"), which takes one input.

        Raises:
            InputError: If there are several.
        """
        if len(self.tensors) != 1:
            raise InputError(
                f"{purpose} take one input tensor, got {len(self.tensors)}: "
                f"{', '.join(map(repr, self.names))}",
                hint="Give one input (--input-key NAME).",
            )
        return next(iter(self.tensors.values()))

    def map(self, fn: Callable[[Tensor], Tensor]) -> Inputs:
        """`fn` applied to every tensor (which must keep the examples along dim 0)."""
        return Inputs({key: fn(tensor) for key, tensor in self.tensors.items()})

    def to(self, device: torch.device | str) -> Inputs:
        """Every tensor moved to `device`."""
        return self.map(lambda tensor: tensor.to(device))

    def shapes(self, *, per_example: bool = False) -> str:
        """`"x (5, 3), mask (5, 7)"`: each name and shape (without dim 0 if `per_example`)."""
        start = 1 if per_example else 0
        return ", ".join(f"{k} {tuple(t.shape[start:])}" for k, t in self.tensors.items())

    def largest(self) -> float:
        """The largest magnitude among the floating-point inputs (NaN without any)."""
        floats = [
            t.abs().max() for t in self.tensors.values() if t.is_floating_point() and t.numel()
        ]
        return float(torch.stack(floats).max()) if floats else float("nan")

    def __repr__(self) -> str:
        return f"Inputs({self.shapes()})"


def as_inputs(value: Inputs | Tensor | Mapping[str, Tensor]) -> Inputs:
    """`value` as `Inputs` (a single tensor is named "x")."""
    return value if isinstance(value, Inputs) else Inputs(value)


def parse_input_keys(keys: str | Sequence[str]) -> list[tuple[str, str]]:
    """The `(name, tensor name)` of each input: `"mask"` or `"mask=attention_mask"`.

    `NAME=TENSOR` reads tensor TENSOR of the data file as the input NAME (forward's
    argument NAME); a plain `NAME` reads tensor NAME.

    Example:
        >>> parse_input_keys(["x", "mask=attention_mask"])
        [('x', 'x'), ('mask', 'attention_mask')]

    Raises:
        InvalidArgumentError: For an empty name or a name given twice.
    """
    pairs = []
    for key in [keys] if isinstance(keys, str) else list(keys):
        name, equals, tensor = str(key).partition("=")
        name, tensor = name.strip(), (tensor if equals else name).strip()
        if not name or not tensor:
            raise InvalidArgumentError(
                f"input key {shorten(key)} names no tensor",
                hint="Write --input-key NAME, or --input-key ARG=NAME to pass tensor NAME "
                "as forward's argument ARG.",
            )
        if name in (pair[0] for pair in pairs):
            raise InvalidArgumentError(f"input {name!r} is given twice", hint="Name each once.")
        pairs.append((name, tensor))
    if not pairs:
        raise InvalidArgumentError("no input key given", hint="Name the input tensor(s).")
    return pairs
