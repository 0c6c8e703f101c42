"""The safetensors byte layout: dtype codes, header encoding and strict header parsing."""

from __future__ import annotations

import ctypes
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

from bnnify.errors import InvalidArgumentError

__all__ = [
    "CODES",
    "DTYPES",
    "MAX_HEADER_BYTES",
    "METADATA_KEY",
    "RANK",
    "HeaderEntry",
    "Malformed",
    "encode_header",
    "parse_header",
    "read_raw_header",
    "write_tensor_bytes",
]

# The limit of the official reader: a larger header is refused there, so here too.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
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


class Malformed(Exception):
    """A problem in a header, reported by the caller with the file name."""


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


def read_raw_header(path: Path) -> tuple[bytes, int]:
    """Returns the header bytes of a file and the number of data bytes after them.

    Raises:
        Malformed: The length prefix is missing or impossible.
        OSError: The file cannot be read.
    """
    with open(path, "rb") as file:
        size = file.seek(0, 2)
        file.seek(0)
        prefix = file.read(8)
        if len(prefix) < 8:
            raise Malformed(f"the file has {size} bytes, too few for a header")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise Malformed(f"header length {length} exceeds {MAX_HEADER_BYTES} bytes")
        if length > size - 8:
            raise Malformed(f"header length {length} exceeds the file size ({size} bytes)")
        raw = file.read(length)
    if len(raw) < length:
        raise Malformed("the file is shorter than its header")
    return raw, size - 8 - length


def parse_header(raw: bytes, data_bytes: int) -> tuple[dict[str, str], list[HeaderEntry]]:
    """Validates a header followed by `data_bytes` bytes of data.

    Returns:
        The metadata, and the tensors sorted by offset.

    Raises:
        Malformed: Anything is wrong; nothing else is raised.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Malformed(
            f"header is not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    if not text.startswith("{"):
        raise Malformed("header does not start with '{'")
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:
        raise Malformed(f"header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise Malformed("header is not a JSON object")
    metadata = header.pop(METADATA_KEY, None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str) and _is_unicode(k) and _is_unicode(v) for k, v in metadata.items()
    ):
        raise Malformed(f"{METADATA_KEY!r} must map strings to strings")
    entries = sorted(
        (_parse_entry(name, entry) for name, entry in header.items()),
        key=lambda entry: (entry[3], entry[4], entry[0]),
    )
    position = 0
    for name, _, _, begin, end in entries:
        if begin != position:
            raise Malformed(
                f"tensor {name!r} starts at byte {begin} of the data, but the previous "
                f"tensor ends at byte {position} (data overlaps or has a hole)"
            )
        if end > data_bytes:
            raise Malformed(f"tensor {name!r} ends beyond the file's {data_bytes} data bytes")
        position = end
    if position != data_bytes:
        raise Malformed(f"{data_bytes - position} bytes follow the last tensor")
    return metadata, entries


def _parse_entry(name: str, entry: object) -> HeaderEntry:
    if not _is_unicode(name):
        raise Malformed(f"tensor name {name!r} is not valid Unicode")
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise Malformed(f"tensor {name!r} must have exactly the keys {sorted(_ENTRY_KEYS)}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise Malformed(
            f"tensor {name!r} has unknown or unsupported dtype {code!r}; "
            f"supported: {', '.join(DTYPES)}"
        )
    if not isinstance(shape, list) or not all(map(_is_count, shape)):
        raise Malformed(f"tensor {name!r} has shape {shape!r}, not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise Malformed(f"tensor {name!r} has data_offsets {offsets!r}, not two offsets")
    begin, end = offsets
    dtype = DTYPES[code]
    if end < begin or _nbytes(shape, dtype.itemsize, end - begin) != end - begin:
        raise Malformed(
            f"tensor {name!r} of dtype {code} and shape {shape} does not fit its "
            f"data_offsets {offsets}"
        )
    return name, dtype, tuple(shape), begin, end


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int:
    """The size of a tensor, or `limit + 1` as soon as it exceeds `limit`."""
    if 0 in shape:
        return 0
    total = itemsize
    for n in shape:
        total *= n
        if total > limit:
            return limit + 1
    return total


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        keys = [key for key, _ in pairs]
        repeated = next(key for key in keys if keys.count(key) > 1)
        raise Malformed(f"key {repeated!r} appears twice in the header")
    return result


def _no_constant(name: str) -> None:
    raise Malformed(f"header holds {name}, which is not JSON")
