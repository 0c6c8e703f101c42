"""The sources of the use cases: a path or an object already in memory, opened one way."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from bnnify.errors import ArgumentTypeError, InputError
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.data import Dataset, load_dataset, load_targets, make_dataset
from bnnify.formats.model_files import LoadedModel, from_module, load_model
from bnnify.formats.model_inputs import Inputs

__all__ = [
    "CheckpointLike",
    "DataLike",
    "InputsLike",
    "ModelLike",
    "Progress",
    "as_checkpoint",
    "as_dataset",
    "derived_name",
    "file_paths",
    "opened_model",
    "path_of",
]

ModelLike = str | Path | LoadedModel | nn.Module
CheckpointLike = str | Path | Checkpoint
# Inputs: one tensor, or tensors by name (several inputs of the model's forward).
InputsLike = Tensor | Mapping[str, Tensor] | Inputs
DataLike = str | Path | Dataset | InputsLike | tuple[InputsLike, Tensor]
# Called with (units just done, total units): elements converted, epochs fitted...
Progress = Callable[[int, int], None]


@contextmanager
def opened_model(
    model: ModelLike, *, trust_pickle: bool = False, key: str | None = None
) -> Iterator[LoadedModel]:
    """`model` as a `LoadedModel`; a file opened here is closed on leaving the block.

    Args:
        model: A path, a `LoadedModel` or an `nn.Module`.
        trust_pickle: Allow full unpickling of a file that needs it.
        key: Where the state dict is in a torch.save checkpoint dict (see `load_model`).

    Raises:
        ArgumentTypeError: If `model` is neither a path, a `LoadedModel` nor an `nn.Module`.
    """
    if isinstance(model, LoadedModel):
        yield model
    elif isinstance(model, nn.Module):
        yield from_module(model)
    else:
        path = _path(model, "model")
        with load_model(path, trust_pickle=trust_pickle, key=key) as loaded:
            yield loaded


def as_checkpoint(checkpoint: CheckpointLike) -> Checkpoint:
    """`checkpoint` opened (a path) or as it is (a `Checkpoint`)."""
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    return Checkpoint(_path(checkpoint, "checkpoint"))


def as_dataset(
    data: DataLike,
    *,
    with_target: bool = True,
    targets: str | Path | Tensor | None = None,
    x_key: str | Sequence[str] = "x",
    y_key: str = "y",
    target: str | None = None,
) -> Dataset:
    """`data` as a checked `Dataset`.

    Args:
        data: A data file (see `load_dataset`), a `Dataset`, the inputs (a tensor,
            or tensors by name: several inputs of the model), or a tuple `(x, y)`.
        with_target: Whether targets are required.
        targets: Targets given apart: a file (see `load_targets`) or a tensor.
        x_key: Name of the input tensor in a data file, or names of several.
        y_key: Name of the target tensor in a data file.
        target: CSV target column (a header name or an index).

    Raises:
        InputError: For unreadable or inconsistent data, or missing targets.
        ArgumentTypeError: If `data` is of another type.
    """
    if isinstance(data, (str, Path)) and not isinstance(targets, Tensor):
        keys = {"x_key": x_key, "y_key": y_key, "target": target}
        return load_dataset(data, with_target=with_target, targets_path=targets, **keys)
    if isinstance(data, (str, Path)):
        x, y, source = load_dataset(data, x_key=x_key, with_target=False).x, None, str(data)
    elif isinstance(data, Dataset):
        x, y, source = data.x, data.y, data.source
    elif isinstance(data, (Tensor, Mapping, Inputs)):
        x, y, source = data, None, "<tensor>" if isinstance(data, Tensor) else "<tensors>"
    elif isinstance(data, tuple) and len(data) == 2:
        (x, y), source = data, "<tensors>"
    else:
        raise ArgumentTypeError(
            f"data: expected a path, a Dataset, a tensor, tensors by name or (x, y), got "
            f"{type(data).__name__}"
        )
    if targets is not None:
        y = targets if isinstance(targets, Tensor) else load_targets(targets, y_key)
    if with_target and y is None:
        raise InputError(f"{source}: no targets", hint="Give the targets with the inputs.")
    return make_dataset(x, y, source)


def file_paths(*inputs: Any) -> list[Path]:
    """The files among `inputs` (what a use case reads, which no output may replace)."""
    paths = []
    for item in inputs:
        if isinstance(item, (str, Path)):
            paths.append(Path(item))
        elif isinstance(item, Checkpoint) or (isinstance(item, LoadedModel) and item.path.exists()):
            paths.append(item.path)
    return paths


def derived_name(checkpoint: Path, tag: str) -> Path:
    """`<stem>.<tag>.safetensors` beside `checkpoint` (a file or a sharded index).

    Example:
        >>> derived_name(Path("runs/m.fit.safetensors"), "cal").as_posix()
        'runs/m.fit.cal.safetensors'
    """
    name = checkpoint.name
    for suffix in (".safetensors.index.json", ".safetensors"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return checkpoint.with_name(f"{name}.{tag}.safetensors")


def path_of(value: Any, what: str = "checkpoint") -> Path:
    """The path of a file input: a path itself, or the `path` of a `Checkpoint`."""
    if isinstance(value, Checkpoint):
        return value.path
    return _path(value, what)


def _path(value: Any, what: str) -> Path:
    if isinstance(value, (str, Path)):
        return Path(value)
    raise ArgumentTypeError(
        f"{what}: expected a path, got {type(value).__name__}",
        hint=f"Pass the {what} as a file path (str or pathlib.Path).",
    )
