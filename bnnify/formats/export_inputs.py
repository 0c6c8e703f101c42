"""What a torch.export program fixes: the input shapes it takes, the types of its modules."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.export.graph_signature import InputKind

from bnnify.bnn.kinds import qualified_name
from bnnify.errors import InputError

__all__ = ["check_shapes", "module_types"]

_DYNAMIC = (
    "Export with a dynamic batch dimension, e.g. torch.export.export(model, (x,), "
    "dynamic_shapes=({0: torch.export.Dim('batch')},)), or give inputs of the exported shape."
)


def module_types(program: Any) -> dict[str, str]:
    """Each module's path and the qualified name of its class, as the program's graph says.

    Read from the `nn_module_stack` of the graph's nodes, so only modules whose forward
    the export traced are there: a parameter read elsewhere (`self.emb.weight[0]`) has
    no known module.
    """
    types: dict[str, str] = {}
    for node in program.graph.nodes:
        for path, kind in (node.meta.get("nn_module_stack") or {}).values():
            types.setdefault(path, kind if isinstance(kind, str) else qualified_name(kind))
    return types


def check_shapes(program: Any, module: nn.Module) -> None:
    """Makes `module` (the program unlifted) refuse inputs of shapes the program fixed.

    torch checks them too, inside the graph, with an `AssertionError` ("Guard failed:
    x.size()[0] == 2") that reads as a bug; a forward pre-hook, run before, raises an
    `InputError` saying which dimension the export fixed and how to export it dynamic.
    Only positional tensor inputs are checked, dimension by dimension where the export
    recorded a number (a dynamic dimension is left to torch's own checks).
    """
    shapes = _static_shapes(program)
    if shapes and any(d is not None for shape in shapes for d in shape or ()):
        module.register_forward_pre_hook(_hook(shapes), prepend=True, with_kwargs=True)


def _static_shapes(program: Any) -> list[tuple[int | None, ...] | None]:
    """Per user input: its shape, a number where fixed and None where dynamic."""
    nodes = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    shapes: list[tuple[int | None, ...] | None] = []
    for spec in program.graph_signature.input_specs:
        if spec.kind is not InputKind.USER_INPUT:
            continue
        node = nodes.get(getattr(spec.arg, "name", None))
        value = node.meta.get("val") if node is not None else None
        if isinstance(value, Tensor):
            shapes.append(tuple(d if isinstance(d, int) else None for d in value.shape))
        else:
            shapes.append(None)
    return shapes


def _hook(shapes: list[tuple[int | None, ...] | None]) -> Any:
    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs or len(args) != len(shapes):
            return  # a pytree of inputs: torch matches it to the graph itself
        for index, (arg, shape) in enumerate(zip(args, shapes, strict=True)):
            if isinstance(arg, Tensor) and shape is not None:
                _check(index, tuple(arg.shape), shape)

    return check


def _check(index: int, got: tuple[int, ...], shape: tuple[int | None, ...]) -> None:
    wanted = "(" + ", ".join("*" if d is None else str(d) for d in shape) + ")"
    if len(got) != len(shape):
        raise InputError(
            f"the torch.export program takes input {index} with {len(shape)} dimensions "
            f"{wanted}, got shape {got}",
            hint="Give inputs of the shape the model was exported with.",
        )
    for dim, (size, fixed) in enumerate(zip(got, shape, strict=True)):
        if fixed is not None and size != fixed:
            raise InputError(
                f"the torch.export program only takes input {index} of shape {wanted} (dimension "
                f"{dim} was fixed at {fixed} when it was exported), got shape {got}",
                hint=_DYNAMIC,
            )
