"""Datasets for `bnnify fit` and `bnnify predict`: safetensors, .npy/.npz and CSV files.

`.npy`/`.npz` files are parsed here (numeric arrays only, never pickled objects),
so numpy is not needed at run time.
"""

from __future__ import annotations

import ast
import csv
import io
import math
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bnnify.errors import InputError, clip, shorten
from bnnify.formats.input_file import open_regular, regular_file
from bnnify.formats.model_inputs import Inputs, as_inputs, parse_input_keys
from bnnify.formats.safetensors_io import is_safetensors, load_file
from bnnify.formats.zip_archive import check_inflation, list_zip

__all__ = ["Dataset", "load_dataset", "load_targets", "load_tensor_file", "make_dataset"]

_NPY_MAGIC = b"\x93NUMPY"
_UNCOMPRESSED = "Save the data uncompressed (numpy.savez) or as safetensors."
# numpy itself refuses headers over 10,000 bytes unless told otherwise.
_NPY_MAX_HEADER = 1 << 16
_NPY_DTYPES = {
    "f2": torch.float16,
    "f4": torch.float32,
    "f8": torch.float64,
    "i1": torch.int8,
    "i2": torch.int16,
    "i4": torch.int32,
    "i8": torch.int64,
    "u1": torch.uint8,
    "b1": torch.bool,
}


@dataclass
class Dataset:
    """Inputs `x` (first dimension: examples) and optional targets `y`.

    `x` is given as one tensor (the input "x") or tensors by name, kept as `Inputs`.
    """

    x: Inputs
    y: Tensor | None
    source: str

    def __post_init__(self) -> None:
        self.x = as_inputs(self.x)

    def __len__(self) -> int:
        return len(self.x)


def _npy_header(raw: bytes, name: str) -> tuple[torch.dtype, bool, tuple[int, ...], int]:
    """Dtype, Fortran order, shape and data offset of a .npy file starting with `raw`."""
    if not raw.startswith(_NPY_MAGIC) or len(raw) < 10:
        raise InputError(f"{name}: not a .npy array")
    size_bytes = 2 if raw[6] == 1 else 4
    length = int.from_bytes(raw[8 : 8 + size_bytes], "little")
    start = 8 + size_bytes
    if length > _NPY_MAX_HEADER or len(raw) < start + length:
        raise InputError(f"{name}: malformed .npy header (length {length})")
    try:
        header = ast.literal_eval(raw[start : start + length].decode("latin1"))
        descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    except (ValueError, SyntaxError, KeyError, TypeError, RecursionError, MemoryError):
        raise InputError(f"{name}: malformed .npy header") from None
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise InputError(
            f"{name}: malformed .npy header: shape {shorten(shape)} is not a tuple of sizes"
        )
    if not isinstance(descr, str) or descr[1:] not in _NPY_DTYPES or descr[0] == ">":
        raise InputError(
            f"{name}: unsupported .npy dtype {shorten(descr)}",
            hint="Save numeric little-endian arrays (float, int or bool), not objects.",
        )
    return _NPY_DTYPES[descr[1:]], bool(fortran), shape, start + length


def _npy_bytes(raw: bytes, name: str) -> int:
    """The size a .npy file declares for itself: its header and its data."""
    dtype, _, shape, offset = _npy_header(raw, name)
    return offset + math.prod(shape) * dtype.itemsize


def _read_npy(raw: bytes, name: str) -> Tensor:
    dtype, fortran, shape, offset = _npy_header(raw, name)
    count = math.prod(shape)
    data = bytearray(raw[offset:])
    if len(data) < count * dtype.itemsize:
        raise InputError(f"{name}: truncated .npy data")
    tensor = (
        torch.frombuffer(data, dtype=dtype, count=count) if count else torch.empty(0, dtype=dtype)
    )
    if fortran:
        return tensor.reshape(shape[::-1]).permute(*reversed(range(len(shape)))).contiguous()
    return tensor.reshape(shape)


def _read_npz(path: Path) -> dict[str, Tensor]:
    """The arrays of an .npz, inflated only after their headers bound what they inflate to."""
    listing = list_zip(path, "data file")
    members = [m.name for m in listing.members if m.name.endswith(".npy")]
    try:
        with zipfile.ZipFile(path) as archive:
            declared = 0
            for member in members:
                with archive.open(member) as stream:
                    head = stream.read(10 + _NPY_MAX_HEADER)
                declared += _npy_bytes(head, f"{path}:{member}")
            check_inflation(listing, declared, hint=_UNCOMPRESSED)
            return {m[:-4]: _read_npy(archive.read(m), f"{path}:{m}") for m in members}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        raise InputError(f"{path}: corrupt .npz archive ({clip(str(error))})") from None


def _read_csv(path: Path) -> tuple[list[str] | None, Tensor]:
    with open_regular(path, "data file") as stream:
        raw = stream.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text (CSV) file") from None
    reader = csv.reader(io.StringIO(text))
    try:
        rows = [row for row in reader if row and any(c.strip() for c in row)]
    except csv.Error as error:
        raise InputError(
            f"{path}: line {reader.line_num} is not valid CSV ({clip(str(error))})",
            hint="Each field holds one number, or a column name in the header row.",
        ) from None
    if not rows:
        raise InputError(f"{path}: empty CSV file")
    header = None
    if any(not _is_number(cell) for cell in rows[0]):
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    width = len(rows[0]) if rows else 0
    values = []
    for number, row in enumerate(rows, start=2 if header else 1):
        if len(row) != width:
            raise InputError(f"{path}: line {number} has {len(row)} columns, expected {width}")
        try:
            values.append([float(cell) for cell in row])
        except ValueError:
            raise InputError(
                f"{path}: line {number} has a non-numeric value: {shorten(row)}"
            ) from None
    if not values:
        raise InputError(f"{path}: no data rows")
    return header, torch.tensor(values, dtype=torch.float64)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def load_tensor_file(path: str | Path, keys: tuple[str, ...] = ("x", "y")) -> dict[str, Tensor]:
    """Tensors of a safetensors, `.npy` or `.npz` file (a `.npy` holds one array: `keys[0]`).

    Raises:
        InputError: The file is missing, not a regular file, or not a supported format.
    """
    path = regular_file(path, "data file")
    if is_safetensors(path):
        return load_file(path)
    with open_regular(path, "data file") as stream:
        head = stream.read(len(_NPY_MAGIC))
        if head == _NPY_MAGIC:
            return {keys[0]: _read_npy(head + stream.read(), str(path))}
    if head.startswith(b"PK"):
        arrays = _read_npz(path)
        if arrays:
            return arrays
    raise InputError(
        f"{path}: not a safetensors, .npy, .npz or CSV file",
        hint="Save the data with safetensors (tensors 'x' and 'y'), numpy or as CSV.",
    )


def _split_csv(path: Path, target: str | None, with_target: bool) -> tuple[Tensor, Tensor | None]:
    header, table = _read_csv(path)
    if not with_target:
        return table, None
    column = table.shape[1] - 1
    if target is not None:
        if header is not None and target in header:
            column = header.index(target)
        else:
            try:
                column = int(target)
            except ValueError:
                choices = f"columns: {', '.join(header)}" if header else "no header row"
                raise InputError(f"{path}: no column {target!r} ({choices})") from None
            if not -table.shape[1] <= column < table.shape[1]:
                raise InputError(f"{path}: column index {target} out of range")
            column %= table.shape[1]
    if table.shape[1] < 2:
        raise InputError(f"{path}: needs at least one feature column besides the target")
    keep = [i for i in range(table.shape[1]) if i != column]
    return table[:, keep], table[:, column]


def _check_finite(tensor: Tensor, what: str, source: str) -> None:
    if tensor.is_floating_point():
        bad = ~torch.isfinite(tensor)
        if bad.any():
            rows = bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten()
            raise InputError(
                f"{source}: {what} has {int(bad.sum())} NaN or infinite value(s), first in "
                f"example {int(rows[0])}",
                hint="Clean or impute the data before fitting.",
            )


def load_dataset(
    path: str | Path,
    *,
    x_key: str | Sequence[str] = "x",
    y_key: str = "y",
    target: str | None = None,
    with_target: bool = True,
    targets_path: str | Path | None = None,
) -> Dataset:
    """Loads inputs (and targets) for fitting or prediction, validating them.

    Args:
        path: A safetensors file (tensors `x_key`, `y_key`), `.npy` (inputs only),
            `.npz` (arrays `x_key`, `y_key`) or CSV (last column the target, or
            `target`: a header name or column index).
        x_key: Name of the input tensor, or names of several (`NAME` or
            `NAME=TENSOR`, see `parse_input_keys`); a CSV or `.npy` file holds one.
        y_key: Name of the target tensor.
        target: CSV target column.
        with_target: Whether targets are expected in `path`.
        targets_path: A separate file holding the targets (first array, or `y_key`).

    Raises:
        InputError: For a missing or unreadable file, missing tensors, NaN or infinite
            values, or inputs and targets of different lengths.
    """
    path = regular_file(path, "data file")
    name = str(path)
    keys = parse_input_keys(x_key)
    x: dict[str, Tensor] = {}
    if path.suffix.lower() in (".csv", ".txt") and not is_safetensors(path):
        _one_input(keys, name, "a CSV file holds one input (its feature columns)")
        x[keys[0][0]], y = _split_csv(path, target, with_target and targets_path is None)
    else:
        tensors = load_tensor_file(path, (keys[0][1], y_key))
        for input_name, key in keys:
            if key not in tensors:
                raise InputError(
                    f"{name}: no tensor {key!r} (found: {', '.join(tensors)})",
                    hint="Name the inputs with --input-key (--x-key).",
                )
            x[input_name] = tensors[key]
        y = tensors.get(y_key) if with_target and targets_path is None else None
        if with_target and targets_path is None and y is None:
            raise InputError(
                f"{name}: no tensor {y_key!r} (found: {', '.join(tensors)})",
                hint="Name the targets with --y-key.",
            )
    if targets_path is not None:
        y = load_targets(targets_path, y_key)
    return make_dataset(x, y, name)


def make_dataset(
    x: Tensor | Mapping[str, Tensor] | Inputs, y: Tensor | None, source: str
) -> Dataset:
    """Inputs and targets checked like a data file's (`source` names them in errors).

    A single 1-D input is one feature per example; among several inputs, a 1-D one
    is one value per example.

    Raises:
        InputError: For no examples, NaN or infinite values, inputs of different
            lengths, or inputs and targets of different lengths.
    """
    tensors = x.tensors if isinstance(x, Inputs) else {"x": x} if isinstance(x, Tensor) else x
    for key, tensor in tensors.items():
        if tensor.dim() == 0 or tensor.shape[0] == 0:
            what = "the inputs" if len(tensors) == 1 else f"input {key!r}"
            raise InputError(f"{source}: no examples in {what} (shape {tuple(tensor.shape)})")
    if len(tensors) == 1:
        tensors = {k: t.unsqueeze(1) if t.dim() == 1 else t for k, t in tensors.items()}
    for key, tensor in tensors.items():
        _check_finite(tensor, "the inputs" if len(tensors) == 1 else f"input {key!r}", source)
    try:
        x = Inputs(tensors)
    except InputError as error:
        raise InputError(f"{source}: {error.message}", hint=error.hint) from None
    if y is not None:
        if y.dim() == 0:
            raise InputError(
                f"{source}: the targets are a single number (shape ()), not one per example",
                hint="Store the targets as a vector or a matrix with one row per example.",
            )
        _check_finite(y, "the targets", source)
        if y.shape[0] != len(x):
            raise InputError(
                f"{source}: {len(x)} input examples but {y.shape[0]} targets",
                hint="Inputs and targets must have the same first dimension.",
            )
    return Dataset(x=x, y=y, source=source)


def _one_input(keys: list[tuple[str, str]], source: str, why: str) -> None:
    if len(keys) > 1:
        names = ", ".join(name for name, _ in keys)
        raise InputError(
            f"{source}: {why}, but {len(keys)} inputs are named ({names})",
            hint="Store several inputs as tensors of a safetensors or .npz file.",
        )


def load_targets(path: str | Path, y_key: str = "y") -> Tensor:
    """Targets kept in a file of their own: CSV, or the tensor `y_key` (or the only one).

    Raises:
        InputError: For a missing, unreadable or non-regular file, or several tensors
            none of which is `y_key`.
    """
    path = regular_file(path, "targets file")
    if path.suffix.lower() in (".csv", ".txt") and not is_safetensors(path):
        _, table = _read_csv(path)
        return table[:, 0] if table.shape[1] == 1 else table
    tensors = load_tensor_file(path, (y_key,))
    if y_key in tensors:
        return tensors[y_key]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise InputError(f"{path}: no tensor {y_key!r} (found: {', '.join(tensors)})")
