"""Model file formats: recognized from the content, checked for safety, and hashed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from enum import Enum
from pathlib import Path
from typing import BinaryIO, NoReturn

import torch

from bnnify.errors import FormatError, InputError, UnsafeInputError
from bnnify.formats.input_file import open_regular, regular_file
from bnnify.formats.safetensors_reader import looks_like_safetensors
from bnnify.formats.sharded import INDEX_SUFFIX, read_index
from bnnify.formats.zip_archive import ZipListing, check_inflation, check_stored, list_zip

__all__ = [
    "ModelFormat",
    "check_export_archive",
    "check_torch_zip",
    "describe",
    "detect_format",
    "refused_global",
    "resolve_model_path",
    "sha256_file",
]

_SUPPORTED = (
    "Supported formats: TorchScript (torch.jit.save), torch.export programs "
    "(torch.export.save), state dicts (torch.save(model.state_dict())), safetensors files, "
    "and Hugging Face sharded safetensors (a directory or its *.safetensors.index.json)."
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
    PICKLED_MODULE = "pickled_module"


_DESCRIPTIONS = {
    ModelFormat.TORCHSCRIPT: "a TorchScript archive",
    ModelFormat.EXPORT: "a torch.export program",
    ModelFormat.STATE_DICT: "a torch.save file",
    ModelFormat.SAFETENSORS: "a safetensors file",
    ModelFormat.SHARDED: "a sharded safetensors index",
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
    """What a file is, from its content ("a torch.save file"), or None if unrecognized."""
    try:
        fmt = _sniff(regular_file(path))
    except InputError:  # FormatError included
        return None
    return _DESCRIPTIONS[fmt]


# ------------------------------------------------------------------ detection


def resolve_model_path(path: str | Path) -> Path:
    """The file behind `path`: itself, or a directory's index file or `model.safetensors`.

    Raises:
        InputError: `path` does not exist, or it (or the file chosen in a directory) is
            not a regular file.
        FormatError: A directory holds no checkpoint, or several index files.
    """
    path = Path(path)
    if not path.is_dir():
        return regular_file(path, "model file")
    indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        raise FormatError(
            f"directory '{path}' holds several index files: {[p.name for p in indexes][:5]}",
            hint="Pass the index file of the checkpoint to use.",
        )
    if indexes:
        return regular_file(indexes[0], "index file")
    single = path / "model.safetensors"
    if single.exists() or single.is_symlink():
        return regular_file(single, "model file")
    raise FormatError(
        f"directory '{path}' holds no *{INDEX_SUFFIX} nor model.safetensors",
        hint=_SUPPORTED + " Pass a model file, not a directory.",
    )


def _head(file: Path) -> tuple[bytes, int]:
    with open_regular(file, "model file") as stream:
        return stream.read(32), os.fstat(stream.fileno()).st_size


def _sniff(file: Path) -> ModelFormat:
    head, size = _head(file)
    if not head:
        raise FormatError(f"'{file}' is empty", hint=_SUPPORTED)
    if looks_like_safetensors(head, size):
        return ModelFormat.SAFETENSORS
    if head[:1] == b"\x80" and _LEGACY_MAGIC in head:
        return ModelFormat.STATE_DICT
    try:
        if head.startswith(b"PK\x03\x04"):
            return _zip_format(list_zip(file, "model file"))
        if head.lstrip().startswith(b"{"):
            read_index(file)
            return ModelFormat.SHARDED
    except FormatError as error:
        raise FormatError(error.message, hint=f"{error.hint or ''} {_SUPPORTED}".strip()) from None
    raise FormatError(f"'{file}' is not a model file bnnify can read", hint=_SUPPORTED)


def _zip_format(listing: ZipListing) -> ModelFormat:
    file = listing.path
    records = {name.partition("/")[2] for name in listing.names()}
    if "archive_format" in records:
        return ModelFormat.EXPORT
    if "constants.pkl" in records or any(r.startswith("code/") for r in records):
        return ModelFormat.TORCHSCRIPT
    if "data.pkl" in records:
        return ModelFormat.STATE_DICT
    if "serialized_exported_program.json" in records:
        raise FormatError(
            f"'{file}' is a torch.export program in the format of torch < 2.8",
            hint="Re-save it with torch.export.save from a recent torch.",
        )
    raise FormatError(f"'{file}' is a zip archive but not a PyTorch file", hint=_SUPPORTED)


def check_torch_zip(file: Path, fmt: ModelFormat) -> None:
    """Refuses a PyTorch zip archive that would inflate beyond the bounds, before torch reads it.

    torch.save archives must store every record uncompressed, as torch.save writes them
    (`torch.load(mmap=True)` would otherwise take compressed bytes for tensor data);
    TorchScript and export archives may compress some records, within `check_inflation`.

    Raises:
        FormatError: A decompression bomb, a compressed torch.save record, or a corrupt zip.
    """
    if fmt not in (ModelFormat.STATE_DICT, ModelFormat.TORCHSCRIPT, ModelFormat.EXPORT):
        return
    with open_regular(file, "model file") as stream:
        if stream.read(4) != b"PK\x03\x04":
            return  # the legacy, non-zip torch.save format
    listing = list_zip(file, "model file")
    if fmt is ModelFormat.STATE_DICT:
        check_stored(listing, "torch.save")
    check_inflation(
        listing,
        hint="Save the model again with torch (torch.save, torch.jit.save "
        "or torch.export.save) without rewriting the archive.",
    )


# Payloads torch.export.load unpickles in full (custom and opaque script objects).
_OBJECT_PAYLOADS = ("custom_obj_", "opaque_obj_")
_OBJECT_RECORDS = tuple(f"data/constants/{prefix}" for prefix in _OBJECT_PAYLOADS)


def check_export_archive(stream: BinaryIO, file: Path) -> None:
    """Refuses a torch.export archive whose loading could run arbitrary code.

    `torch.export.load` unpickles some payloads with `weights_only=False` (tensor
    subclasses, and its sample inputs when they fail to load with `weights_only=True`),
    custom and opaque objects with full pickle, and loads AOTInductor native libraries.
    An archive passes when it holds none of those objects and every pickle in it loads
    with `weights_only=True`, so torch takes only its safe paths.

    Args:
        stream: The open archive, later passed to `torch.export.load` (same file).
        file: Its path, for messages.

    Raises:
        UnsafeInputError: If loading the archive could run arbitrary code.
        FormatError: If the archive is corrupt.
    """
    with zipfile.ZipFile(stream) as archive:
        records = {name.partition("/")[2]: name for name in archive.namelist()}
        pickles = [n for r, n in records.items() if r.startswith("data/sample_inputs/")]
        pickles += [
            n for r, n in records.items() if re.fullmatch(r"data/(weights|constants)/[^/]*\.pt", r)
        ]
        for record, name in records.items():
            if any(ord(c) < 32 or ord(c) == 127 for c in name):
                _refuse_pt2(file, f"a record with a control character in its name ({name!r})")
            if record.startswith("data/aotinductor/"):
                _refuse_pt2(file, f"AOTInductor native code ({record})")
            if record.startswith(_OBJECT_RECORDS):
                _refuse_pt2(file, f"a pickled Python object ({record})")
            if re.fullmatch(r"data/(weights|constants)/[^/]*_config\.json", record):
                config = _pt2_config(archive.read(name), file)
                directory = name.rpartition("/")[0]
                pickles += [f"{directory}/{p}" for p in config]
        for name in pickles:
            try:
                data = archive.read(name)
            except (KeyError, zipfile.BadZipFile, OSError) as error:
                raise FormatError(f"'{file}' is a corrupt torch.export archive: {error}") from None
            try:
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as error:  # any failure makes torch retry without weights_only
                found = refused_global(error)
                _refuse_pt2(file, f"a pickle that needs {found or 'more than weights'} ({name})")


def refused_global(error: BaseException) -> str | None:
    """The class or function a weights-only `torch.load` refused, from its message."""
    found = re.search(r"GLOBAL (\S+) (?:was not an allowed|whose module)", str(error))
    return found.group(1) if found else None


def _pt2_config(data: bytes, file: Path) -> list[str]:
    """The payload files of a torch.export weights or constants config that are pickles."""
    try:
        entries = list(json.loads(data)["config"].values())
        names = [str(e["path_name"]) for e in entries]
        pickled = [str(e["path_name"]) for e in entries if e.get("use_pickle")]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise FormatError(f"'{file}' has a corrupt payload config: {error!r}") from None
    # torch decides what to unpickle from the config, so the config is what is checked.
    for path_name in names:
        if path_name.startswith(_OBJECT_PAYLOADS) or any(ord(c) < 32 for c in path_name):
            _refuse_pt2(file, f"a pickled Python object ({path_name!r})")
    return pickled


def _refuse_pt2(file: Path, what: str) -> NoReturn:
    raise UnsafeInputError(
        f"'{file}' is a torch.export program holding {what}: loading it can run arbitrary code",
        hint="If you trust this file, pass --trust-pickle (trust_pickle=True). "
        "Better, export the model without tensor subclasses, custom objects or AOTInductor.",
    )
