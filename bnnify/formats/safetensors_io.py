"""Safetensors files written tensor by tensor with bounded memory, and read strictly.

The official writer needs every tensor in memory at once; these writers stream one
tensor at a time. Reading goes through the official reader (`safetensors_reader`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from bnnify.errors import (
    ArgumentTypeError,
    FormatError,
    InvalidArgumentError,
)
from bnnify.formats.safetensors_layout import (
    CODES,
    MAX_HEADER_BYTES,
    METADATA_KEY,
    RANK,
    TensorInfo,
    encode_header,
    write_tensor_bytes,
)
from bnnify.formats.safetensors_reader import (
    SafetensorsFile,
    is_safetensors,
    load_file,
    read_header,
)

__all__ = [
    "MAX_HEADER_BYTES",
    "SafetensorsFile",
    "SafetensorsWriter",
    "ShardedWriter",
    "TensorInfo",
    "is_safetensors",
    "load_file",
    "plan_order",
    "read_header",
    "save_file",
]

TempPath = Callable[[Path], str | Path] | Mapping[Path, str | Path]


def plan_order(infos: Iterable[TensorInfo]) -> list[TensorInfo]:
    """Returns the tensors in the order the official writer stores them.

    Tensors are sorted by descending dtype (wider first, as in the safetensors dtype enum),
    then by name, so that files match `safetensors.torch.save_file` byte for byte.

    Raises:
        InvalidArgumentError: A name is empty, reserved or repeated.
        ArgumentTypeError: A name is not a string.
        FormatError: A dtype cannot be stored in safetensors.
    """
    infos = list(infos)
    seen: set[str] = set()
    for info in infos:
        _check_name(info.name, "tensor name")
        if info.name in seen:
            raise InvalidArgumentError(f"tensor name {info.name!r} is given more than once")
        seen.add(info.name)
        _code(info)
    return sorted(infos, key=lambda info: (-RANK[info.dtype], info.name))


class SafetensorsWriter:
    """Streams tensors into a safetensors file, one at a time, in storage order.

    The header is written on construction; `write` must then be called for each name of
    `order`, in that order, and `finish` at the end. Each tensor's bytes go from its memory
    to the file without a file-sized buffer; a tensor that is not contiguous or not on the
    CPU is copied, alone, first.

    Args:
        file: A binary file open for writing, positioned at the start of the file.
        infos: The tensors the file will hold.
        metadata: Free-form text metadata stored in the header.

    Example:
        >>> import io
        >>> weight = torch.ones(2, 3)
        >>> buffer = io.BytesIO()
        >>> writer = SafetensorsWriter(buffer, [TensorInfo.of("weight", weight)], {"k": "v"})
        >>> writer.write("weight", weight)
        >>> writer.finish()
        >>> len(buffer.getvalue()) % 8
        0
    """

    def __init__(
        self,
        file: BinaryIO,
        infos: Sequence[TensorInfo],
        metadata: Mapping[str, str] | None = None,
    ):
        self._infos = plan_order(infos)
        self.order = [info.name for info in self._infos]
        self._file = file
        self._next = 0
        entries, offset = [], 0
        for info in self._infos:
            entries.append((info.name, info.dtype, info.shape, offset, offset + info.nbytes))
            offset += info.nbytes
        file.write(encode_header(entries, _checked_metadata(metadata)))

    @property
    def done(self) -> bool:
        """Whether every tensor was written."""
        return self._next == len(self._infos)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Writes the next tensor, which must be `order[i]` with its declared dtype and shape.

        Raises:
            RuntimeError: The name is not the next in `order`, or dtype or shape differ.
            FormatError: The tensor is sparse.
        """
        if self.done:
            raise RuntimeError(f"cannot write {name!r}: all {len(self._infos)} tensors written")
        info = self._infos[self._next]
        if name != info.name:
            raise RuntimeError(f"tensor {name!r} written out of order: expected {info.name!r}")
        if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise RuntimeError(
                f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)} but was declared "
                f"{info.dtype} {info.shape}"
            )
        if tensor.layout != torch.strided:
            raise FormatError(
                f"tensor {name!r} is {tensor.layout}, which safetensors files cannot hold",
                hint="Convert it with .to_dense() first.",
            )
        write_tensor_bytes(self._file, tensor)
        self._next += 1

    def finish(self) -> None:
        """Checks that every tensor was written, and flushes the file.

        Raises:
            RuntimeError: Some tensors were never written.
        """
        if not self.done:
            missing = self.order[self._next :]
            raise RuntimeError(f"{len(missing)} tensors never written: {missing[:5]}")
        self._file.flush()


def save_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes `tensors` to the safetensors file `path`, one tensor at a time.

    The file is written in place; make it atomic with `bnnify.formats.atomic.AtomicOutputs`.
    """
    infos = [TensorInfo.of(name, tensor) for name, tensor in tensors.items()]
    with open(path, "wb") as file:
        writer = SafetensorsWriter(file, infos, metadata)
        for name in writer.order:
            writer.write(name, tensors[name])
        writer.finish()


class ShardedWriter:
    """Streams tensors into Hugging Face-style shards plus an index, in storage order.

    Shards are planned on construction, filled in storage order up to `max_shard_bytes` of
    tensor data each (a larger tensor gets a shard of its own), and named
    `{stem}-00001-of-00003.safetensors`. The index `{stem}.safetensors.index.json` maps each
    tensor to its shard; its metadata is `metadata` plus `total_size`, the bytes of tensor
    data as a string. Every shard header carries `metadata`. Each shard file is opened when
    its first tensor arrives and closed after its last, so memory stays near the largest
    tensor. Nothing is written before the first `write`, so `paths()` can be handed to
    `AtomicOutputs` first and its `temp` assigned to `temp_path` afterwards.

    Args:
        directory: The folder of the shards and the index.
        stem: The common start of the file names, such as `"model"`.
        infos: The tensors to store.
        metadata: Free-form text metadata.
        max_shard_bytes: The most tensor bytes in one shard.
        temp_path: The file to really write for each final path (a function or a mapping),
            such as `AtomicOutputs.temp`; by default the final path itself.

    Raises:
        InvalidArgumentError: `max_shard_bytes` is not positive, `stem` is not a plain file
            name, or `metadata` has a `total_size` key.

    Example:
        >>> import tempfile
        >>> from bnnify.formats.atomic import AtomicOutputs
        >>> tmp = tempfile.TemporaryDirectory()
        >>> folder = Path(tmp.name)
        >>> tensors = {"a": torch.zeros(4), "b": torch.ones(4)}
        >>> infos = [TensorInfo.of(name, t) for name, t in tensors.items()]
        >>> writer = ShardedWriter(folder, "model", infos, {"k": "v"}, max_shard_bytes=16)
        >>> with AtomicOutputs(writer.paths()) as outputs:
        ...     writer.temp_path = outputs.temp
        ...     for name in writer.order:
        ...         writer.write(name, tensors[name])
        ...     writer.finish()
        >>> [p.name for p in sorted(folder.iterdir())]  # doctest: +NORMALIZE_WHITESPACE
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors',
         'model.safetensors.index.json']
        >>> tmp.cleanup()
    """

    def __init__(
        self,
        directory: str | Path,
        stem: str,
        infos: Sequence[TensorInfo],
        metadata: Mapping[str, str] | None,
        max_shard_bytes: int,
        *,
        temp_path: TempPath | None = None,
    ):
        if max_shard_bytes <= 0:
            raise InvalidArgumentError(
                f"max_shard_bytes must be positive, got {max_shard_bytes!r}",
                hint="Give a shard size such as 5GB.",
            )
        if not stem or stem != Path(stem).name or stem in (".", ".."):
            raise InvalidArgumentError(f"shard stem must be a plain file name, got {stem!r}")
        self._metadata = _checked_metadata(metadata)
        if self._metadata is not None and "total_size" in self._metadata:
            raise InvalidArgumentError("metadata key 'total_size' is reserved for the index")
        ordered = plan_order(infos)
        self.order = [info.name for info in ordered]
        self.temp_path = temp_path
        self._shards = _split(ordered, max_shard_bytes)
        count = len(self._shards)
        directory = Path(directory)
        self._files = [
            directory / f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
        ]
        self.index_path = directory / f"{stem}.safetensors.index.json"
        self._total = sum(info.nbytes for info in ordered)
        self._written = 0
        self._shard = 0
        self._file: BinaryIO | None = None
        self._writer: SafetensorsWriter | None = None

    def paths(self) -> list[Path]:
        """Returns every file this writer creates: the shards, then the index."""
        return [*self._files, self.index_path]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Writes the next tensor of `order` into its shard.

        Raises:
            RuntimeError: The name is not the next in `order`, or dtype or shape differ.
        """
        if self._writer is None:
            if self._shard == len(self._shards):
                raise RuntimeError(f"cannot write {name!r}: all {len(self.order)} tensors written")
            self._open_shard()
        assert self._writer is not None
        self._writer.write(name, tensor)
        self._written += 1
        if self._writer.done:
            self._close_shard()

    def finish(self) -> None:
        """Checks that every tensor was written, then writes the index.

        Raises:
            RuntimeError: Some tensors were never written.
        """
        missing = self.order[self._written :]
        if missing:
            self.close()
            raise RuntimeError(f"{len(missing)} tensors never written: {missing[:5]}")
        while self._shard < len(self._shards):  # only when there are no tensors at all
            self._open_shard()
            self._close_shard()
        weight_map = {
            info.name: path.name
            for shard, path in zip(self._shards, self._files, strict=True)
            for info in shard
        }
        index = {
            "metadata": {**(self._metadata or {}), "total_size": str(self._total)},
            "weight_map": weight_map,
        }
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        with open(self._temp(self.index_path), "w", encoding="utf-8") as file:
            file.write(text)

    def close(self) -> None:
        """Closes the shard being written, if any, without completing it."""
        if self._file is not None:
            self._file.close()
        self._file, self._writer = None, None

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _temp(self, final: Path) -> Path:
        if self.temp_path is None:
            return final
        if callable(self.temp_path):
            return Path(self.temp_path(final))
        return Path(self.temp_path[final])

    def _open_shard(self) -> None:
        self._file = open(self._temp(self._files[self._shard]), "wb")  # noqa: SIM115
        self._writer = SafetensorsWriter(self._file, self._shards[self._shard], self._metadata)

    def _close_shard(self) -> None:
        assert self._writer is not None and self._file is not None
        self._writer.finish()
        self.close()
        self._shard += 1


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str):
        raise ArgumentTypeError(f"{what} must be a string, got {type(name).__name__} {name!r}")
    if not name or name == METADATA_KEY:
        raise InvalidArgumentError(f"{what} {name!r} is not allowed: it is empty or reserved")


def _checked_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    for key, value in metadata.items():
        _check_name(key, "metadata key")
        if not isinstance(value, str):
            raise ArgumentTypeError(
                f"metadata value of {key!r} must be a string, got {type(value).__name__}",
                hint="Store structured values as JSON text.",
            )
    return dict(sorted(metadata.items()))


def _code(info: TensorInfo) -> str:
    code = CODES.get(info.dtype)
    if code is None:
        raise FormatError(
            f"tensor {info.name!r} has dtype {info.dtype}, which safetensors files cannot hold",
            hint=f"Supported dtypes: {', '.join(str(d) for d in CODES)}.",
        )
    return code


def _split(ordered: list[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in ordered:
        if shards[-1] and size + info.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards
