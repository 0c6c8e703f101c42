"""The safetensors byte layout: dtype codes, tensor descriptions and header encoding."""

from __future__ import annotations

import ctypes
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from bnnify.errors import InvalidArgumentError
from bnnify.formats.safetensors_header import MAX_HEADER_BYTES, METADATA_KEY

__all__ = [
    "CODES",
    "DTYPES",
    "MAX_HEADER_BYTES",
    "METADATA_KEY",
    "RANK",
    "HeaderEntry",
    "TensorInfo",
    "encode_header",
    "write_tensor_bytes",
]

_CHUNK_BYTES = 1 << 24

# The safetensors dtype enum in its declaration order: the official writer stores tensors
# by descending position in it, then by name. Codes torch lacks are skipped; complex and
# packed (F4, F6) dtypes are not supported.
_ENUM = [
    ("BOOL", "bool"),
    ("U8", "uint8"),
    ("I8", "int8"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("I16", "int16"),
    ("U16", "uint16"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("I32", "int32"),
    ("U32", "uint32"),
    ("F32", "float32"),
    ("F64", "float64"),
    ("I64", "int64"),
    ("U64", "uint64"),
]
CODES: dict[torch.dtype, str] = {
    getattr(torch, name): code for code, name in _ENUM if hasattr(torch, name)
}
DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code in CODES.items()}
RANK: dict[torch.dtype, int] = {dtype: rank for rank, dtype in enumerate(CODES)}

# Name, dtype, shape, and the data offsets [begin, end) of one tensor.
HeaderEntry = tuple[str, torch.dtype, tuple[int, ...], int, int]


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))

    @property
    def nbytes(self) -> int:
        """The size of the tensor's data in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorInfo:
        """Describes `tensor` under `name`."""
        return cls(name, tensor.dtype, tuple(tensor.shape))


def encode_header(entries: Sequence[HeaderEntry], metadata: dict[str, str] | None) -> bytes:
    """Returns the length prefix and the space-padded JSON header of a file."""
    header: dict[str, Any] = {} if metadata is None else {METADATA_KEY: metadata}
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
    # Compact, unescaped UTF-8, as serde_json writes it in the official writer.
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":"))
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidArgumentError(f"names and metadata must be valid Unicode: {error}") from None
    data += b" " * (-len(data) % 8)
    if len(data) > MAX_HEADER_BYTES:
        raise InvalidArgumentError(
            f"the header would take {len(data)} bytes, over the {MAX_HEADER_BYTES} bytes "
            "safetensors readers accept",
            hint="Store fewer tensors or less metadata per file.",
        )
    return len(data).to_bytes(8, "little") + data


def write_tensor_bytes(file: BinaryIO, tensor: torch.Tensor) -> None:
    """Writes the little-endian bytes of a dense tensor, copying it only if it must."""
    data = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    size = data.element_size()
    if sys.byteorder == "big" and size > 1:
        data = data.reshape(-1).view(torch.uint8).view(-1, size).flip(1).contiguous()
    nbytes = data.numel() * size
    if nbytes == 0:
        return
    # A view of the tensor's own memory: `data` stays referenced until the loop ends.
    view = memoryview((ctypes.c_ubyte * nbytes).from_address(data.data_ptr())).cast("B")
    for start in range(0, nbytes, _CHUNK_BYTES):
        chunk = view[start : start + _CHUNK_BYTES]
        while chunk:
            written = file.write(chunk)
            if written is None or written >= len(chunk):
                break
            chunk = chunk[written:]
