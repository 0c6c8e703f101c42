"""Model file formats: recognized from the content, checked for safety, and hashed."""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from enum import Enum
from pathlib import Path

import torch

from bnnify.errors import BnnifyError, FormatError
from bnnify.formats.input_file import open_regular, regular_file
from bnnify.formats.safetensors_reader import looks_like_safetensors
from bnnify.formats.sharded import BIN_INDEX_SUFFIX, INDEX_SUFFIX, ShardedIndex, read_index
from bnnify.formats.zip_archive import ZipListing, check_inflation, check_stored, list_zip

__all__ = [
    "ModelFormat",
    "describe",
    "detect_format",
    "refused_global",
    "resolve_model_path",
    "sha256_file",
    "shard_format",
]

_SUPPORTED = (
    "Supported formats: TorchScript (torch.jit.save), torch.export programs "
    "(torch.export.save), state dicts (torch.save(model.state_dict())), safetensors files, "
    "and Hugging Face folders (model.safetensors, pytorch_model.bin, or the "
    "*.safetensors.index.json or *.bin.index.json of their shards)."
)
# A folder's checkpoint, in Hugging Face's order of preference: safetensors first.
_FOLDER_FILES = (
    f"*{INDEX_SUFFIX}",
    "model.safetensors",
    f"*{BIN_INDEX_SUFFIX}",
    "pytorch_model.bin",
)
# torch.save's legacy (non-zip) format: a pickled magic number follows the protocol opcode.
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_CHUNK = 1 << 20


class ModelFormat(str, Enum):
    """The kinds of model files bnnify reads (the words `bnnify convert` reports)."""

    TORCHSCRIPT = "torchscript"
    EXPORT = "export"
    STATE_DICT = "state_dict"
    SAFETENSORS = "safetensors"
    SHARDED = "sharded_safetensors"
    # Hugging Face's sharded pytorch_model.bin: an index of torch.save state dicts.
    SHARDED_STATE_DICT = "sharded_state_dict"
    PICKLED_MODULE = "pickled_module"
    # Not a file: an `nn.Module` handed to the Python API (`model_files.from_module`).
    MODULE = "module"


_DESCRIPTIONS = {
    ModelFormat.TORCHSCRIPT: "a TorchScript archive",
    ModelFormat.EXPORT: "a torch.export program",
    ModelFormat.STATE_DICT: "a torch.save file",
    ModelFormat.SAFETENSORS: "a safetensors file",
    ModelFormat.SHARDED: "a sharded safetensors index",
    ModelFormat.SHARDED_STATE_DICT: "a sharded torch.save index",
    ModelFormat.PICKLED_MODULE: "a torch.save file",
}


def detect_format(path: str | Path) -> ModelFormat:
    """The format of the model at `path`, from its content (the extension is ignored).

    A pickled whole `nn.Module` is a `torch.save` archive like a state dict: it is
    reported as `STATE_DICT` here and told apart by `load_model`.

    Raises:
        InputError: If `path` does not exist.
        FormatError: If the content is not one of the supported formats.
    """
    return _sniff(resolve_model_path(path))


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a model file, read in chunks.

    For a sharded checkpoint (its directory or its index file) the digest covers the
    index file's bytes followed by every shard's bytes, shards in sorted name order;
    for a directory holding a single `model.safetensors`, that file's bytes.

    Raises:
        InputError: If `path` or a shard does not exist or is not a regular file.
        FormatError: If a directory holds no checkpoint or the index is malformed.
        UnsafeInputError: If a shard lies outside the index's folder.
    """
    file = resolve_model_path(path)
    digest = hashlib.sha256()
    files = [file]
    head, size = _head(file)
    if not looks_like_safetensors(head, size) and head.lstrip().startswith(b"{"):
        files += read_index(file).files
    for part in files:
        with open_regular(part, "model file") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def describe(path: str | Path) -> str | None:
    """What a file (or the checkpoint a folder holds, as `detect_format` finds it) is, from
    its content ("a torch.save file"), or None if unrecognized."""
    try:
        fmt = _sniff(resolve_model_path(path))
    except BnnifyError:  # unreadable, malformed, or an index pointing outside its folder
        return None
    return _DESCRIPTIONS[fmt]


# ------------------------------------------------------------------ detection


def resolve_model_path(path: str | Path) -> Path:
    """The file behind `path`: itself, or the checkpoint a Hugging Face folder holds.

    In a folder, the first of these is used: a `*.safetensors.index.json`,
    `model.safetensors`, a `*.bin.index.json`, `pytorch_model.bin`.

    Raises:
        InputError: `path` does not exist, or it (or the file chosen in a directory) is
            not a regular file.
        FormatError: A directory holds no checkpoint, or several index files of a kind.
    """
    path = Path(path)
    if not path.is_dir():
        return regular_file(path, "model file")
    for pattern in _FOLDER_FILES:
        if "*" in pattern:
            found = sorted(path.glob(pattern))
            if len(found) > 1:
                raise FormatError(
                    f"directory '{path}' holds several index files: {[p.name for p in found][:5]}",
                    hint="Pass the index file of the checkpoint to use.",
                )
            if found:
                return regular_file(found[0], "index file")
        elif (path / pattern).exists() or (path / pattern).is_symlink():
            return regular_file(path / pattern, "model file")
    raise FormatError(
        f"directory '{path}' holds no checkpoint: none of {', '.join(_FOLDER_FILES)}",
        hint=_SUPPORTED + " Pass a model file, not a directory.",
    )


def shard_format(index: ShardedIndex) -> ModelFormat:
    """`SHARDED` or `SHARDED_STATE_DICT`: the format every shard has (each is checked).

    Raises:
        FormatError: A shard is neither safetensors nor a torch.save file, or the shards
            mix the two.
    """
    kinds = {}
    for name, file in index.shards.items():
        fmt = _sniff(file, index=False)  # an index naming an index would loop
        if fmt not in (ModelFormat.SAFETENSORS, ModelFormat.STATE_DICT):
            raise FormatError(
                f"'{index.path}': shard {name!r} is {_DESCRIPTIONS[fmt]}, not a safetensors "
                "or torch.save state dict",
                hint="Download the checkpoint again.",
            )
        kinds.setdefault(fmt, name)
    if len(kinds) > 1:
        raise FormatError(
            f"'{index.path}' mixes safetensors shards ({kinds[ModelFormat.SAFETENSORS]!r}) and "
            f"torch.save shards ({kinds[ModelFormat.STATE_DICT]!r})",
            hint="Download one format of the checkpoint.",
        )
    if ModelFormat.SAFETENSORS in kinds:
        return ModelFormat.SHARDED
    return ModelFormat.SHARDED_STATE_DICT


def _head(file: Path) -> tuple[bytes, int]:
    with open_regular(file, "model file") as stream:
        return stream.read(32), os.fstat(stream.fileno()).st_size


def _sniff(file: Path, index: bool = True) -> ModelFormat:
    head, size = _head(file)
    if not head:
        raise FormatError(f"'{file}' is empty", hint=_SUPPORTED)
    if looks_like_safetensors(head, size):
        return ModelFormat.SAFETENSORS
    if head[:1] == b"\x80" and _LEGACY_MAGIC in head:
        return ModelFormat.STATE_DICT
    if head.startswith(b"PK\x03\x04") or zipfile.is_zipfile(file):
        listing = _bounded_zip(file)
        fmt = _zip_format(file)
        if fmt is ModelFormat.STATE_DICT:
            check_stored(listing, "torch.save")
        return fmt
    if index and head.lstrip().startswith(b"{"):
        try:
            found = read_index(file)
        except FormatError as error:
            raise FormatError(
                error.message, hint=f"{error.hint or ''} {_SUPPORTED}".strip()
            ) from None
        return shard_format(found)
    raise FormatError(f"'{file}' is not a model file bnnify can read", hint=_SUPPORTED)


def _bounded_zip(file: Path) -> ZipListing:
    """The archive's members, refused before torch's reader inflates any of them.

    `PyTorchFileReader` reads a version record as it opens an archive, so a bomb is
    refused here, from the central directory, before `_zip_format` opens it. A
    torch.save archive must moreover store its records uncompressed, as torch.save
    writes them (`torch.load(mmap=True)` would take compressed bytes for tensor data).
    """
    kind = "torch.export archive" if _first_member(file).startswith(_EXPORT_RECORDS) else None
    try:
        listing = list_zip(file, "model file", kind=kind or "zip archive")
    except FormatError as error:
        raise FormatError(error.message, hint=f"{error.hint} {_SUPPORTED}") from None
    check_inflation(
        listing,
        hint="Save the model again with torch (torch.save, torch.jit.save or "
        "torch.export.save), without rewriting the archive.",
    )
    return listing


def _zip_format(file: Path) -> ModelFormat:
    """The format of a zip archive, from the records torch's own reader finds in it.

    torch.load, torch.jit.load and torch.export.load all read zips with miniz
    (`PyTorchFileReader`); Python's zipfile sees another archive in some files (a
    torch.save archive stored inside a truncated .pt2), so it only words the errors.
    """
    try:
        reader = torch._C.PyTorchFileReader(str(file))
    except RuntimeError as error:
        names = _zipfile_names(file)
        if any(name.rpartition("/")[2] == "archive_format" for name in names):
            return ModelFormat.EXPORT  # what torch.export.load tries; its loader refuses it
        raise _unreadable_zip(file, names, error) from None
    if reader.has_record("archive_format"):
        return ModelFormat.EXPORT
    if reader.has_record("constants.pkl"):
        return ModelFormat.TORCHSCRIPT
    if reader.has_record("data.pkl"):
        return ModelFormat.STATE_DICT
    raise FormatError(f"'{file}' is a zip archive but not a PyTorch file", hint=_SUPPORTED)


def _zipfile_names(file: Path) -> list[str]:
    try:
        with zipfile.ZipFile(file) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return []


def _unreadable_zip(file: Path, names: list[str], error: RuntimeError) -> FormatError:
    if "serialized_exported_program.json" in names:
        return FormatError(
            f"'{file}' is a torch.export program in the format of torch < 2.8",
            hint="Re-save it with torch.export.save from a recent torch.",
        )
    if _first_member(file).startswith(_EXPORT_RECORDS):
        kind = "torch.export archive"
    elif names:  # Python's zipfile reads it whole: not truncated, not PyTorch's
        return FormatError(f"'{file}' is a zip archive but not a PyTorch file", hint=_SUPPORTED)
    else:
        kind = "zip archive"
    reason = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
    return FormatError(
        f"'{file}' is a truncated or corrupt {kind}: {reason}",
        hint="Copy or download the file again. " + _SUPPORTED,
    )


# Records torch.export.save writes first, to name the format of a truncated archive.
_EXPORT_RECORDS = ("data/weights/", "data/constants/", "models/", "archive_format")


def _first_member(file: Path) -> str:
    """The name in the first local header, without its root folder, or "" if none.

    Read by hand: zipfile reads nothing without the central directory at the end.
    """
    with open(file, "rb") as stream:
        header = stream.read(30)
        if len(header) < 30 or not header.startswith(b"PK\x03\x04"):
            return ""
        name = stream.read(int.from_bytes(header[26:28], "little"))
    return name.decode("utf-8", "replace").partition("/")[2]


def refused_global(error: BaseException) -> str | None:
    """The class or function a weights-only `torch.load` refused, from its message."""
    found = re.search(r"GLOBAL (\S+) (?:was not an allowed|whose module)", str(error))
    return found.group(1) if found else None
