"""Sharded checkpoints of safetensors or torch.save shards: the index read once, shards in place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from bnnify.errors import FormatError, UnsafeInputError, shorten
from bnnify.formats.input_file import open_regular, regular_file
from bnnify.formats.strict_json import load_json

__all__ = [
    "BIN_INDEX_SUFFIX",
    "INDEX_SUFFIX",
    "MAX_INDEX_BYTES",
    "ShardedIndex",
    "read_index",
    "read_weight_map",
]

INDEX_SUFFIX = ".safetensors.index.json"
# Hugging Face's index of torch.save shards (pytorch_model.bin.index.json): the same JSON.
BIN_INDEX_SUFFIX = ".bin.index.json"
# A weight map of a million tensors is a few tens of MB; anything larger is not an index.
MAX_INDEX_BYTES = 64 << 20
_SHAPE_HINT = 'An index file looks like {"metadata": {...}, "weight_map": {tensor: shard file}}.'


@dataclass(frozen=True)
class ShardedIndex:
    """A checked index file and the shard files it names.

    Attributes:
        path: The index file, as given.
        metadata: Its `"metadata"` object (empty when absent); values are not checked.
        weight_map: Tensor name -> shard name, as written in the index.
        shards: Shard name -> its file, symbolic links resolved; every file is a regular
            file inside the folder that holds the index.
    """

    path: Path
    metadata: dict[str, Any]
    weight_map: dict[str, str]
    shards: dict[str, Path]

    @property
    def files(self) -> list[Path]:
        """The shard files, in sorted shard-name order (each once)."""
        return [self.shards[name] for name in sorted(self.shards)]

    def file_of(self, tensor: str) -> Path:
        """The shard file holding `tensor` (a name of `weight_map`)."""
        return self.shards[self.weight_map[tensor]]


def read_index(path: str | Path) -> ShardedIndex:
    """Reads and checks a sharded checkpoint's index file and locates every shard.

    The index is read by `read_weight_map`. Each shard name is resolved with symbolic
    links followed and must land, as a regular file, in the index's folder: the folder it
    was named in, or the folder it really lies in when it is a link (as in the Hugging
    Face cache). A shard elsewhere (an absolute name, `..`, or a link pointing out) would
    read a file the user never named.

    Raises:
        InputError: The index or a shard is missing or not a regular file.
        FormatError: The index is not a well-formed index file.
        UnsafeInputError: A shard lies outside the index's folder.
    """
    path = Path(path)
    metadata, weight_map = _read(path)
    roots = (path.parent.resolve(), path.resolve().parent)
    shards = {shard: _shard_file(path, roots, shard) for shard in sorted(set(weight_map.values()))}
    return ShardedIndex(path, metadata, weight_map, shards)


def read_weight_map(path: str | Path) -> dict[str, str]:
    """The checked weight map of an index file (tensor -> shard name), shards not located.

    The index must be a regular file of at most `MAX_INDEX_BYTES` holding strict JSON
    (see `load_json`) with a non-empty `"weight_map"` of tensor names to shard names.

    Raises:
        InputError: The index is missing or not a regular file.
        FormatError: The index is not a well-formed index file.
    """
    return _read(Path(path))[1]


def _read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    with open_regular(path, "index file") as stream:
        data = stream.read(MAX_INDEX_BYTES + 1)
    if len(data) > MAX_INDEX_BYTES:
        raise FormatError(
            f"'{path}' is over {MAX_INDEX_BYTES >> 20} MB: too large for an index file",
            hint=_SHAPE_HINT,
        )
    index = load_json(data, f"'{path}'", "the index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(
            f"'{path}' is not a sharded checkpoint's index: no non-empty \"weight_map\" object",
            hint=_SHAPE_HINT,
        )
    bad = [name for name, shard in weight_map.items() if not isinstance(shard, str) or not shard]
    if bad:
        raise FormatError(
            f"'{path}': the weight map names no shard file for {len(bad)} tensors, "
            f"such as {shorten(bad[0])}",
            hint=_SHAPE_HINT,
        )
    metadata = index.get("metadata", {})
    if not isinstance(metadata, dict):
        raise FormatError(f"'{path}': \"metadata\" is not an object", hint=_SHAPE_HINT)
    return metadata, weight_map


def _shard_file(index: Path, roots: tuple[Path, Path], shard: str) -> Path:
    """The resolved file of `shard`, confined to the index's folder (as named, or real)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in shard):
        raise FormatError(f"'{index}' names shard {shorten(shard)}, a name with control characters")
    relative = PurePath(shard)
    if relative.is_absolute() or ".." in relative.parts:
        raise _outside(index, shard, "names a file outside its folder")
    joined = index.parent / relative
    try:
        real = joined.resolve(strict=True)
    except FileNotFoundError:
        raise FormatError(
            f"'{index}' names shard {shorten(shard)}, but '{joined}' does not exist",
            hint="Download every shard of the checkpoint next to its index file.",
        ) from None
    except (OSError, RuntimeError) as error:  # a symbolic link loop
        raise FormatError(
            f"'{index}': shard {shorten(shard)} cannot be resolved: {error}"
        ) from None
    if not any(real.is_relative_to(root) for root in roots):
        raise _outside(index, shard, f"is a link to '{real}', outside the index's folder")
    return regular_file(real, f"shard {shorten(shard)} of '{index}'")


def _outside(index: Path, shard: str, problem: str) -> UnsafeInputError:
    return UnsafeInputError(
        f"'{index}': shard {shorten(shard)} {problem}; bnnify reads only the files of the "
        "checkpoint's folder",
        hint="Put the shard files themselves (not links to elsewhere) next to the index file.",
    )
