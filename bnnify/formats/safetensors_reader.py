"""Safetensors files validated by the official reader, then read one tensor at a time.

`safetensors.safe_open` checks the header (size limit, UTF-8, JSON, dtypes, offsets that
tile the data exactly). It is opened once per file; each tensor is then read by its
offset into a fresh tensor, so that no mapping keeps the file's pages resident and no
header is parsed again per tensor (which made many-tensor files quadratic).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from bnnify.errors import FormatError, InputError, closest, shorten
from bnnify.formats.input_file import open_regular
from bnnify.formats.safetensors_header import (
    REWRITE_HINT,
    Header,
    looks_like_safetensors,
    malformed,
)
from bnnify.formats.safetensors_layout import DTYPES, TensorInfo

__all__ = [
    "SafetensorsFile",
    "is_safetensors",
    "load_file",
    "looks_like_safetensors",
    "read_header",
]


def is_safetensors(path: str | Path) -> bool:
    """Tells from its first bytes whether `path` is a regular file in safetensors format."""
    try:
        with open_regular(path) as file:
            return looks_like_safetensors(file.read(9), os.fstat(file.fileno()).st_size)
    except InputError:
        return False


class SafetensorsFile:
    """A safetensors file whose header was validated; tensors are read on demand.

    Beyond the official reader's checks, a header naming a key twice is refused (readers
    disagree on which copy wins), as are dtypes torch cannot hold (F4, F6, complex).

    Args:
        path: The file.
        what: What the file is, for messages ("checkpoint", "data file"...).

    Attributes:
        metadata: The `__metadata__` strings (empty when absent).
        infos: Name -> dtype and shape, in storage order.

    Raises:
        InputError: The file is missing, unreadable or not a regular file.
        FormatError: The file is not a well-formed safetensors file; the message says why.
    """

    def __init__(self, path: str | Path, what: str = "safetensors file"):
        self.path = Path(path)
        self._what = what
        header = Header(self.path, what)
        self.metadata: dict[str, str] = header.metadata
        self._data_start = header.data_start
        self._spans: dict[str, tuple[int, int]] = {}
        infos = []
        for name, entry in header.entries.items():
            dtype = DTYPES.get(entry.code)
            if dtype is None:
                raise malformed(
                    self.path,
                    f"tensor {shorten(name)} has dtype {shorten(entry.code)}, which bnnify "
                    f"cannot read (supported: {', '.join(DTYPES)})",
                )
            self._spans[name] = (entry.begin, entry.end)
            infos.append(TensorInfo(name, dtype, entry.shape))
        self.infos: dict[str, TensorInfo] = {info.name: info for info in infos}

    def tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Reads tensor `name` into a new tensor.

        Raises:
            InputError: The file has no tensor `name`, or it cannot be read.
            FormatError: The file became shorter since it was opened.
        """
        info = self.infos.get(name)
        if info is None:
            raise InputError(
                f"'{self.path}' has no tensor {shorten(name)}.{closest(name, self.infos)}",
                hint=f"It holds {len(self.infos)} tensors: {', '.join(list(self.infos)[:10])}"
                + (", ..." if len(self.infos) > 10 else ""),
            )
        begin, end = self._spans[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        if end > begin:
            with open_regular(self.path, self._what) as file:
                file.seek(self._data_start + begin)
                _read_exactly(file, out.data_ptr(), end - begin, self.path)
            if sys.byteorder == "big" and info.dtype.itemsize > 1:
                size = info.dtype.itemsize
                flipped = out.reshape(-1).view(torch.uint8).view(-1, size).flip(1)
                out = flipped.contiguous().view(info.dtype).reshape(info.shape)
        return out.to(device)


def _read_exactly(file: object, address: int, count: int, path: Path) -> None:
    view = memoryview((ctypes.c_ubyte * count).from_address(address)).cast("B")
    done = 0
    while done < count:
        read = file.readinto(view[done:])  # type: ignore[attr-defined]
        if not read:
            raise FormatError(
                f"'{path}' ended {count - done} bytes early: it changed while being read",
                hint=REWRITE_HINT,
            )
        done += read


def read_header(path: str | Path) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """The metadata and the tensors (in storage order) of a safetensors file.

    Raises:
        InputError: The file cannot be read.
        FormatError: The file is not a well-formed safetensors file; the message says why.
    """
    file = SafetensorsFile(path)
    return file.metadata, file.infos


def load_file(
    path: str | Path,
    names: Iterable[str] | None = None,
    device: str | int | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Loads tensors from a safetensors file, after validating its header.

    Args:
        path: The file.
        names: The tensors to load; all of them by default.
        device: Where to put the tensors.

    Raises:
        InputError: The file cannot be read, or lacks one of `names`.
        FormatError: The file is malformed.
    """
    file = SafetensorsFile(path)
    wanted = list(file.infos) if names is None else list(names)
    where = f"cuda:{device}" if isinstance(device, int) else device
    return {name: file.tensor(name, where) for name in wanted}
