"""Model file formats: recognized from the content, checked for safety, and hashed."""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from enum import Enum
from pathlib import Path
from typing import BinaryIO, NoReturn

import torch

from bnnify.errors import FormatError, InputError, UnsafeInputError

__all__ = [
    "ModelFormat",
    "check_export_archive",
    "detect_format",
    "read_index",
    "refused_global",
    "resolve_model_path",
    "sha256_file",
    "shard_path",
]

_SUPPORTED = (
    "Supported formats: TorchScript (torch.jit.save), torch.export programs "
    "(torch.export.save), state dicts (torch.save(model.state_dict())), safetensors files, "
    "and Hugging Face sharded safetensors (a directory or its *.safetensors.index.json)."
)
# torch.save's legacy (non-zip) format: a pickled magic number follows the protocol opcode.
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_MAX_JSON_BYTES = 64 << 20
_MAX_SAFETENSORS_HEADER = 100 << 20
_CHUNK = 1 << 20


class ModelFormat(str, Enum):
    """The kinds of model files bnnify reads (the words `bnnify convert` reports)."""

    TORCHSCRIPT = "torchscript"
    EXPORT = "export"
    STATE_DICT = "state_dict"
    SAFETENSORS = "safetensors"
    SHARDED = "sharded_safetensors"
    PICKLED_MODULE = "pickled_module"
    # Not a file: an `nn.Module` handed to the Python API (`model_files.from_module`).
    MODULE = "module"


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
        InputError: If `path` does not exist.
        FormatError: If a directory holds no checkpoint or an index names a missing shard.
    """
    file = resolve_model_path(path)
    digest = hashlib.sha256()
    files = [file]
    try:
        sharded = _sniff(file) is ModelFormat.SHARDED
    except FormatError:
        sharded = False
    if sharded:
        weight_map = read_index(file)
        files += [shard_path(file, shard) for shard in sorted(set(weight_map.values()))]
    for part in files:
        with open(part, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------ detection


def resolve_model_path(path: str | Path) -> Path:
    """The file behind `path`: itself, or a directory's index file or `model.safetensors`."""
    path = Path(path)
    if not path.exists():
        raise InputError(
            f"no such file or directory: '{path}'", hint="Check the path of the model file."
        )
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise FormatError(
                f"directory '{path}' holds several index files: {[p.name for p in indexes]}",
                hint="Pass the index file of the checkpoint to use.",
            )
        if indexes:
            return indexes[0]
        if (path / "model.safetensors").is_file():
            return path / "model.safetensors"
        raise FormatError(
            f"directory '{path}' holds no *.safetensors.index.json nor model.safetensors",
            hint=_SUPPORTED + " Pass a model file, not a directory.",
        )
    if not path.is_file():
        raise FormatError(f"'{path}' is not a regular file", hint=_SUPPORTED)
    return path


def _sniff(file: Path) -> ModelFormat:
    size = file.stat().st_size
    with open(file, "rb") as stream:
        head = stream.read(32)
    if not head:
        raise FormatError(f"'{file}' is empty", hint=_SUPPORTED)
    header_len = int.from_bytes(head[:8].ljust(8, b"\0"), "little")
    if head[8:9] == b"{" and 2 <= header_len <= min(size - 8, _MAX_SAFETENSORS_HEADER):
        return ModelFormat.SAFETENSORS
    if head[:1] == b"\x80" and _LEGACY_MAGIC in head:
        return ModelFormat.STATE_DICT
    if zipfile.is_zipfile(file):
        return _zip_format(file)
    if head.startswith(b"PK\x03\x04"):
        raise FormatError(
            f"'{file}' is a truncated or corrupt zip archive",
            hint="Copy or download the file again. " + _SUPPORTED,
        )
    if head.lstrip().startswith(b"{"):
        read_index(file)
        return ModelFormat.SHARDED
    raise FormatError(f"'{file}' is not a model file bnnify can read", hint=_SUPPORTED)


def _zip_format(file: Path) -> ModelFormat:
    try:
        with zipfile.ZipFile(file) as archive:
            records = {name.partition("/")[2] for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError) as error:
        raise FormatError(f"'{file}' is a corrupt zip archive: {error}", hint=_SUPPORTED) from error
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


def read_index(file: Path) -> dict[str, str]:
    """The `weight_map` of a sharded checkpoint's index file, checked.

    Raises:
        FormatError: If the file is not JSON, has no weight map, or maps a name to no shard.
    """
    if file.stat().st_size > _MAX_JSON_BYTES:
        raise FormatError(f"'{file}' is too large for a JSON index file", hint=_SUPPORTED)
    try:
        index = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"'{file}' is not valid JSON: {error}", hint=_SUPPORTED) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise FormatError(
            f"'{file}' is JSON but not a safetensors index: no \"weight_map\" object",
            hint='An index file looks like {"metadata": {...}, "weight_map": {name: shard}}. '
            + _SUPPORTED,
        )
    bad = [name for name, shard in weight_map.items() if not isinstance(shard, str) or not shard]
    if bad or not weight_map:
        raise FormatError(
            f"'{file}': the weight map is empty or names no shard file for {bad[:5]}",
            hint="Each weight_map entry maps a tensor name to a shard file name.",
        )
    return weight_map


def shard_path(index: Path, shard: str) -> Path:
    """The file of `shard`, named by index file `index`, checked to exist beside it."""
    relative = Path(shard)
    if relative.is_absolute() or ".." in relative.parts:
        raise FormatError(
            f"'{index}' names shard {shard!r} outside its directory",
            hint="Shard names are file names relative to the index file.",
        )
    path = index.parent / relative
    if not path.is_file():
        raise FormatError(
            f"'{index}' names shard {shard!r}, but '{path}' does not exist",
            hint="Download every shard of the checkpoint next to its index file.",
        )
    return path


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
