"""A safetensors header read and validated without torch: metadata, entries, small vectors.

`bnnify kl REPORT` and `bnnify inspect` read metadata only; importing torch for that
costs seconds and hundreds of MB. The official reader (`safetensors.safe_open`) validates
a header, but imports its framework (torch or numpy) to open a file; so where torch is
not loaded, the same layout checks are made here (`official=False`): header size,
UTF-8 JSON without repeated keys, known dtypes, offsets that tile the data exactly.
"""

from __future__ import annotations

import math
import os
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from bnnify.errors import FormatError, InputError, clip, shorten
from bnnify.formats.input_file import open_regular
from bnnify.formats.strict_json import load_json

__all__ = [
    "MAX_HEADER_BYTES",
    "METADATA_KEY",
    "REWRITE_HINT",
    "Entry",
    "Header",
    "looks_like_safetensors",
    "malformed",
    "read_vector",
]

# The limit of the official reader: a larger header is refused there, so here too.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"
REWRITE_HINT = (
    "Check that the file was copied completely, or save it again with safetensors.torch.save_file."
)
_OFFICIAL_PREFIX = "Error while deserializing header: "
# Vectors read without torch: safetensors code -> `array` typecode of the same width.
_ARRAY_CODES = {"F64": "d", "F32": "f", "I64": "q", "I32": "i", "U8": "B"}
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2}
_ITEM_BYTES |= {"I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
_ITEM_BYTES |= dict.fromkeys(["F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"], 1)


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """Whether a file of `size` bytes starting with `head` (9 bytes or more) is safetensors.

    The one sniffer of the format: a little-endian header length the official reader
    accepts (at most `MAX_HEADER_BYTES`, within the file) followed by `{`.
    """
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= min(MAX_HEADER_BYTES, size - 8) and head[8:9] == b"{"


def malformed(path: str | Path, problem: str) -> FormatError:
    """The error for a file that is not well-formed safetensors."""
    return FormatError(
        f"'{path}' is not a valid safetensors file: {clip(problem, 300)}", hint=REWRITE_HINT
    )


@dataclass(frozen=True)
class Entry:
    """One tensor of a header: its dtype code ("F32"), shape and data offsets [begin, end)."""

    name: str
    code: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


class Header:
    """The validated header of a safetensors file.

    Args:
        path: The file.
        what: What the file is, for messages ("checkpoint", "KL report"...).
        official: Validate with the official reader (imports torch); else by the same
            rules here.

    Attributes:
        metadata: The `__metadata__` strings (empty when absent).
        entries: Name -> `Entry`, in storage order.
        data_start: Where the tensor data begins in the file.

    Raises:
        InputError: The file is missing, unreadable or not a regular file.
        FormatError: The file is not a well-formed safetensors file; the message says why.
    """

    def __init__(self, path: str | Path, what: str = "safetensors file", *, official: bool = True):
        self.path = Path(path)
        with open_regular(self.path, what) as file:
            size = os.fstat(file.fileno()).st_size
            prefix = file.read(8)
            if len(prefix) < 8:
                raise malformed(self.path, f"it has {size} bytes, too few for a header")
            length = int.from_bytes(prefix, "little")
            if length > min(MAX_HEADER_BYTES, size - 8):
                limit = "the file size" if length <= MAX_HEADER_BYTES else "the reader's limit"
                raise malformed(self.path, f"its header length {length} exceeds {limit}")
            raw = file.read(length)
        if not looks_like_safetensors(prefix + raw[:1], size):
            raise malformed(self.path, "its header does not start with '{'")
        self.data_start = 8 + length
        if official:
            self.metadata = self._official_metadata(what)
        # This parse refuses repeated keys and yields the offsets.
        try:
            header = load_json(raw, f"'{self.path}'", "its header")
        except FormatError as error:
            raise FormatError(error.message, hint=REWRITE_HINT) from None
        if not official:
            self.metadata = _checked_metadata(header, self.path)
        header.pop(METADATA_KEY, None)
        entries = [_entry(name, e, self.path, official) for name, e in header.items()]
        entries.sort(key=lambda e: (e.begin, e.end, e.name))
        if not official:
            _check_tiling(entries, size - self.data_start, self.path)
        self.entries: dict[str, Entry] = {e.name: e for e in entries}

    def _official_metadata(self, what: str) -> dict[str, str]:
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                return handle.metadata() or {}
        except SafetensorError as error:
            raise malformed(self.path, str(error).removeprefix(_OFFICIAL_PREFIX)) from None
        except OSError as error:
            raise InputError(
                f"cannot read {what} '{self.path}': {error.strerror or error}"
            ) from None


def _checked_metadata(header: object, path: Path) -> dict[str, str]:
    if not isinstance(header, dict):
        raise malformed(path, "its header is not a JSON object")
    metadata = header.get(METADATA_KEY) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise malformed(path, "its __metadata__ is not a map of strings")
    return metadata


def _entry(name: str, entry: object, path: Path, official: bool) -> Entry:
    if not official:
        ok = isinstance(entry, dict) and entry.get("dtype") in _ITEM_BYTES
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
        numbers = [*shape, *offsets] if ok else []
        if not ok or not all(type(n) is int and n >= 0 for n in numbers):
            raise malformed(path, f"tensor {shorten(name)} has an invalid entry {shorten(entry)}")
    return Entry(name, entry["dtype"], tuple(entry["shape"]), *entry["data_offsets"])


def _check_tiling(entries: list[Entry], data_bytes: int, path: Path) -> None:
    """The tensors' bytes follow each other from 0 to the end of the file, sized exactly."""
    position = 0
    for e in entries:
        if e.begin != position or e.end - e.begin != e.elements * _ITEM_BYTES[e.code]:
            raise malformed(path, f"the data offsets of tensor {shorten(e.name)} are invalid")
        position = e.end
    if position != data_bytes:
        raise malformed(path, f"its tensors take {position} bytes, the data {data_bytes}")


def read_vector(header: Header, name: str) -> list[float] | list[int]:
    """The values of tensor `name` of `header`'s file as a flat list, read without torch.

    Raises:
        FormatError: The file has no such tensor, its dtype is not one of F64, F32, I64,
            I32 or U8, or the file became shorter since its header was read.
    """
    entry = header.entries.get(name)
    if entry is None or entry.code not in _ARRAY_CODES:
        found = "no such tensor" if entry is None else f"dtype {shorten(entry.code)}"
        raise FormatError(f"'{header.path}': cannot read tensor {shorten(name)} ({found})")
    values = array(_ARRAY_CODES[entry.code])
    count = entry.end - entry.begin
    with open_regular(header.path) as file:
        file.seek(header.data_start + entry.begin)
        data = file.read(count)
    if len(data) != count or count % values.itemsize:
        raise FormatError(
            f"'{header.path}' ended {count - len(data)} bytes early: it changed while being read",
            hint=REWRITE_HINT,
        )
    values.frombytes(data)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()
