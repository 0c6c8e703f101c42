"""A variational checkpoint's metadata, read without torch: what `bnnify inspect` shows.

`Checkpoint` (which imports torch) opens a checkpoint to read its tensors and checks
them against this metadata; `CheckpointHeader` reads the metadata alone, in a fraction
of a second. Both find the checkpoint of a folder, and check the format, the same way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import bnnify
from bnnify.errors import FormatError, InputError, shorten
from bnnify.formats.input_file import open_regular, regular_file
from bnnify.formats.safetensors_header import Header, looks_like_safetensors
from bnnify.formats.sharded import read_index
from bnnify.formats.strict_json import load_json

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointHeader",
    "check_format",
    "checkpoint_in",
    "metadata_json",
    "string_metadata",
]

FORMAT = "bnnify.variational"
FORMAT_VERSION = "1"
SUPPORTED = {"1"}
_NOT_A_CHECKPOINT_HINT = (
    "bnnify kl, inspect, fit and predict read the checkpoints `bnnify convert` writes "
    "(*.bnn.safetensors, the index of a sharded one, or the folder holding either)."
)


def checkpoint_in(path: str | Path) -> Path:
    """`path`, or for a folder the one checkpoint in it: a sharded index, else a file.

    A sharded checkpoint is also found by the name it was written to: `-o x.safetensors`
    writes `x.safetensors.index.json` and its shards, and `x.safetensors` names them.

    Raises:
        InputError: The folder holds no checkpoint, or several (they are listed).
    """
    path = Path(path)
    if path.name.endswith(".safetensors") and not os.path.lexists(path):
        index = path.with_name(f"{path.name}.index.json")
        return index if index.is_file() else path
    if not path.is_dir():
        return path
    for pattern in ("*.safetensors.index.json", "*.bnn.safetensors"):
        found = sorted(p for p in path.glob(pattern) if p.is_file())
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(p.name for p in found[:5])
            raise InputError(
                f"folder '{path}' holds {len(found)} checkpoints ({names}): which one?",
                hint="Name the file (or the sharded index) itself.",
            )
    raise InputError(
        f"folder '{path}' holds no checkpoint (no *.bnn.safetensors or *.safetensors.index.json)",
        hint=_NOT_A_CHECKPOINT_HINT,
    )


def string_metadata(metadata: Any, source: str) -> dict[str, str]:
    """The metadata of a checkpoint, checked to map strings to strings."""
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(f"{source}: the metadata must map strings to strings")
    return metadata


def metadata_json(metadata: Mapping[str, str], key: str, source: str, kind: type) -> Any:
    """The JSON value of metadata `key`, which must be a `kind` (dict or list)."""
    if key not in metadata:
        raise FormatError(f"{source}: malformed bnnify metadata (no {key!r})")
    try:
        value = load_json(metadata[key], source, f"metadata {key!r}")
    except FormatError as error:
        problem = error.message.removeprefix(f"{source}: ")
        raise FormatError(f"{source}: malformed bnnify metadata ({problem})") from None
    if not isinstance(value, kind):
        raise FormatError(
            f"{source}: malformed bnnify metadata ({key!r} is not a JSON {kind.__name__})"
        )
    return value


def check_format(metadata: Mapping[str, Any], path: Path, kind: str) -> None:
    """Refuses metadata that is not a bnnify checkpoint's of a supported version.

    Raises:
        FormatError: With what was found and what to do.
    """
    found = metadata.get("bnnify.format")
    if found != FORMAT:
        what = f"{kind} without bnnify metadata" if found is None else None
        raise FormatError(
            f"'{path}' is not a bnnify checkpoint "
            f"({what or f'its format is {shorten(found)}, expected {FORMAT!r}'}): "
            "run `bnnify convert` first",
            hint="Create one with `bnnify convert MODEL`.",
        )
    version = metadata.get("bnnify.format_version")
    if version not in SUPPORTED:
        raise FormatError(
            f"{path}: checkpoint format version {shorten(version)} is not supported by "
            f"bnnify {bnnify.__version__} (supported: {', '.join(sorted(SUPPORTED))})",
            hint="Upgrade bnnify, or convert the model again with this version.",
        )


class CheckpointHeader:
    """The metadata of a checkpoint file, a sharded index, or the folder holding one.

    The tensors are not read, nor checked against the metadata (`Checkpoint` does that).

    Attributes:
        path: The checkpoint file or index (a folder's resolved).
        files: Every file of the checkpoint (the index and its shards, or the one file).
        sharded: Whether it is a sharded checkpoint.
        metadata: The bnnify metadata strings.
        spec, source, parameters, deterministic: The JSON of `bnnify.spec`,
            `bnnify.source`, `bnnify.parameters` and `bnnify.deterministic`.
        fit: The JSON of `bnnify.fit`, or None before `bnnify fit`.

    Raises:
        InputError: The file is missing or unreadable, or a folder holds no checkpoint.
        FormatError: It is not a bnnify checkpoint of a supported version, or its
            metadata is malformed.
    """

    def __init__(self, path: str | Path):
        self.path = checkpoint_in(path)
        regular_file(self.path, "checkpoint")
        with open_regular(self.path, "checkpoint") as stream:
            head = stream.read(16)
            size = os.fstat(stream.fileno()).st_size
        self.sharded = not looks_like_safetensors(head, size)
        if self.sharded and not head.lstrip().startswith(b"{"):
            raise FormatError(
                f"'{self.path}' is not a bnnify checkpoint (not a safetensors file): run "
                "`bnnify convert` first",
                hint=_NOT_A_CHECKPOINT_HINT,
            )
        if self.sharded:
            index = read_index(self.path)
            raw: Any = index.metadata
            self.files = [self.path, *sorted(set(index.shards.values()))]
        else:
            raw = Header(self.path, "checkpoint", official=False).metadata
            self.files = [self.path]
        kind = "a sharded safetensors index" if self.sharded else "a safetensors file"
        check_format(raw, self.path, kind)
        source = str(self.path)
        self.metadata = string_metadata(raw, source)
        self.spec: dict[str, Any] = metadata_json(self.metadata, "bnnify.spec", source, dict)
        self.source: dict[str, Any] = metadata_json(self.metadata, "bnnify.source", source, dict)
        self.parameters: dict[str, Any] = metadata_json(
            self.metadata, "bnnify.parameters", source, dict
        )
        self.deterministic: dict[str, Any] = metadata_json(
            self.metadata, "bnnify.deterministic", source, dict
        )
        self.fit: dict[str, Any] | None = (
            metadata_json(self.metadata, "bnnify.fit", source, dict)
            if "bnnify.fit" in self.metadata
            else None
        )
        for name, record in {**self.parameters, **self.deterministic}.items():
            shape = record.get("shape") if isinstance(record, dict) else None
            if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
                raise FormatError(f"{source}: malformed record {shorten(name)}")
