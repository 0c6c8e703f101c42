"""Saved models in every supported format, recognized by their content, with lazy tensor access."""

from __future__ import annotations

import hashlib
import logging
import math
import pickle
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn
from torch.export.graph_signature import InputKind

from bnnify.errors import (
    ArgumentTypeError,
    BnnifyError,
    FormatError,
    InputError,
    InvalidArgumentError,
    UnknownNameError,
    UnsafeInputError,
    UsageError,
    closest,
    shorten,
)
from bnnify.formats.detect import (
    ModelFormat,
    detect_format,
    refused_global,
    resolve_model_path,
    sha256_file,
)
from bnnify.formats.export_archive import load_export
from bnnify.formats.safetensors_io import SafetensorsWriter, TensorInfo
from bnnify.formats.safetensors_reader import SafetensorsFile
from bnnify.formats.sharded import read_index
from bnnify.formats.ties import alias_key, find_ties

__all__ = [
    "LoadedModel",
    "ModelFormat",
    "TensorMeta",
    "detect_format",
    "from_module",
    "load_model",
    "sha256_file",
]

logger = logging.getLogger("bnnify")

_RESAVE = (
    "Better, re-save it without pickled objects: torch.save(model.state_dict(), path), "
    "torch.jit.save(torch.jit.script(model), path) or "
    "torch.export.save(torch.export.export(model, args), path)."
)
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")


@dataclass(frozen=True)
class TensorMeta:
    """Name, dtype, shape and role of one tensor of a model file.

    `kind` is "parameter" or "buffer" where the file says so (TorchScript, torch.export,
    a trusted pickled module), else "unknown" (state dicts and safetensors files).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: str

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


class LoadedModel:
    """The tensors of a model file, by name, and its module when the format has one.

    Built by `load_model`. Safetensors files and sharded checkpoints are memory-mapped
    and read one tensor at a time; the other formats are loaded whole (zip state dicts
    are memory-mapped by `torch.load`). Also a context manager that calls `close()`.

    Attributes:
        path: The path given to `load_model`.
        format: The format found in the file's content.
        sha256: The checkpoint's digest (see `sha256_file`).
        module: The `torch.jit.ScriptModule`, `torch.export.ExportedProgram` or trusted
            `nn.Module` the file holds; None for state dicts and safetensors.
    """

    def __init__(
        self,
        path: Path,
        format: ModelFormat,
        sha256: str,
        module: object | None,
        metas: dict[str, TensorMeta],
        fetch: Callable[[str], Tensor],
        close: Callable[[], None] | None = None,
    ):
        self.path = path
        self.format = format
        self.sha256 = sha256
        self.module = module
        self._metas = metas
        self._fetch: Callable[[str], Tensor] | None = fetch
        self._close = close

    def names(self) -> list[str]:
        """Tensor names in the order of the file (tied parameters once)."""
        return list(self._metas)

    def meta(self, name: str) -> TensorMeta:
        """Dtype, shape and kind of tensor `name`, without reading its data.

        Raises:
            UnknownNameError: If the model has no tensor `name`.
        """
        meta = self._metas.get(name)
        if meta is None:
            raise UnknownNameError(
                f"{self.path} has no tensor named {name!r} ({len(self._metas)} tensors)."
                + closest(name, self._metas),
                hint="List the names with LoadedModel.names() (`bnnify inspect`).",
            )
        return meta

    def tensor(self, name: str) -> Tensor:
        """Tensor `name` (detached), read from the file now for lazily loaded formats.

        Raises:
            UnknownNameError: If the model has no tensor `name`.
            UsageError: If the model was closed.
        """
        self.meta(name)
        if self._fetch is None:
            raise UsageError(
                f"{self.path} was closed", hint="Read tensors before close() or the with block."
            )
        return self._fetch(name).detach()

    def ties(self) -> dict[str, str]:
        """Tensors sharing an earlier one's memory (tied weights) -> its name.

        Only a state dict lists tied tensors under each name: the formats that hold
        a module list each distinct tensor once, and safetensors files cannot tie.
        """
        if self.format is not ModelFormat.STATE_DICT:
            return {}
        return find_ties((name, self.tensor(name)) for name in self.names())

    def close(self) -> None:
        """Releases the open files and memory maps; `tensor()` fails afterwards."""
        self._fetch = None
        if self._close is not None:
            self._close, close = None, self._close
            close()

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __contains__(self, name: object) -> bool:
        return name in self._metas

    def __len__(self) -> int:
        return len(self._metas)

    def __repr__(self) -> str:
        return f"LoadedModel({str(self.path)!r}, format={self.format.value!r}, tensors={len(self)})"


def load_model(path: str | Path, *, device: str = "cpu", trust_pickle: bool = False) -> LoadedModel:
    """Loads a model file of any supported format, detected from its content.

    What each format may run while loading:

    - TorchScript archives carry TorchScript code, compiled by `torch.jit.load`; it runs
      no arbitrary Python while loading, but the module does hold code.
    - torch.export programs: `torch.export.load` has no `weights_only` switch. It reads a
      JSON graph and raw tensor bytes, but unpickles tensor subclasses, custom and
      opaque objects with full pickle, retries its sample inputs with
      `weights_only=False`, loads AOTInductor native libraries, and evaluates or runs
      as Python some strings of the graph. Unless `trust_pickle`, bnnify loads it with
      `bnnify.formats.export_archive.load_export`: torch's own zip reader must see the
      archive as Python's zipfile does, every unpickle is weights-only, and anything
      that would run code from the file raises `UnsafeInputError`.
    - `torch.save` files load with `weights_only=True`; one needing more (a pickled whole
      `nn.Module`, arbitrary objects) raises `UnsafeInputError` unless `trust_pickle`,
      which reloads it with `weights_only=False` (this can run arbitrary code).
    - safetensors files and sharded checkpoints hold data only.

    Args:
        path: A file, a sharded checkpoint's directory or index file, or a directory
            holding one `model.safetensors`.
        device: Where tensors are placed (`tensor()` moves those of an export program).
        trust_pickle: Allow full unpickling of files that need it (trusted files only).

    Returns:
        The loaded model; close it (or use `with`) to release memory maps.

    Raises:
        InputError: If `path` does not exist or a trusted pickle fails to load.
        FormatError: If the content is not a supported format or is inconsistent.
        UnsafeInputError: If loading needs arbitrary code and `trust_pickle` is False.
        InvalidArgumentError: If `device` is not a device name.
    """
    file = resolve_model_path(path)
    fmt = detect_format(file)
    device = _device(device)
    digest = sha256_file(path)
    loader = {
        ModelFormat.TORCHSCRIPT: _load_torchscript,
        ModelFormat.EXPORT: _load_export,
        ModelFormat.STATE_DICT: _load_pickle,
        ModelFormat.SAFETENSORS: _load_safetensors,
        ModelFormat.SHARDED: _load_sharded,
    }[fmt]
    fmt, module, metas, fetch, close = loader(file, device, trust_pickle)
    logger.info("loaded %s: %s, %d tensors, sha256 %s", path, fmt.value, len(metas), digest)
    return LoadedModel(Path(path), fmt, digest, module, metas, fetch, close)


def from_module(module: nn.Module) -> LoadedModel:
    """An `nn.Module` held in memory, as a model of format `MODULE` (nothing is copied).

    Its `sha256` is the digest of its state dict written as a safetensors file without
    metadata, so that `fit` and `predict` recognize the module a checkpoint came from.

    Raises:
        ArgumentTypeError: If `module` is not an `nn.Module`.
    """
    if not isinstance(module, nn.Module):
        raise ArgumentTypeError(
            f"expected a model file or an nn.Module, got {type(module).__name__}",
            hint="Pass a path, a LoadedModel or the nn.Module itself.",
        )
    digest = hashlib.sha256()
    state = module.state_dict()
    writer = SafetensorsWriter(_Digest(digest), [TensorInfo.of(n, t) for n, t in state.items()])
    for name in writer.order:
        writer.write(name, state[name])
    fmt, module, metas, fetch, close = _from_module(module, ModelFormat.MODULE)
    path = Path(f"<{type(module).__name__}>")
    return LoadedModel(path, fmt, digest.hexdigest(), module, metas, fetch, close)


class _Digest:
    """A write-only file that hashes what is written to it."""

    def __init__(self, digest: Any):
        self.digest = digest

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return len(data)

    def flush(self) -> None:
        pass


def _device(device: str | torch.device) -> str:
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError) as error:
        raise InvalidArgumentError(
            f"invalid device {device!r}: {error}", hint="Use e.g. 'cpu', 'cuda' or 'cuda:1'."
        ) from None


# -------------------------------------------------------------------- loaders

_Loaded = tuple[ModelFormat, Any, dict[str, TensorMeta], Callable[[str], Tensor], Any]


def _load_torchscript(file: Path, device: str, trust_pickle: bool) -> _Loaded:
    try:
        module = torch.jit.load(str(file), map_location=device)
    except RuntimeError as error:
        raise FormatError(
            f"'{file}' is a corrupt TorchScript archive: {_first_line(error)}"
        ) from error
    return _from_module(module, ModelFormat.TORCHSCRIPT)


def _load_export(file: Path, device: str, trust_pickle: bool) -> _Loaded:
    with open(file, "rb") as stream:
        try:
            # A stream, not a path: torch warns about paths not ending in ".pt2".
            program = load_export(stream, file, trust_pickle=trust_pickle)
        except BnnifyError:
            raise
        except Exception as error:  # deserializing can fail in any layer of torch
            raise FormatError(
                f"'{file}' is a corrupt torch.export program: {_first_line(error)}",
                hint="Re-save it with torch.export.save from the installed torch.",
            ) from error
    kinds = {
        InputKind.PARAMETER: "parameter",
        InputKind.BUFFER: "buffer",
        InputKind.CONSTANT_TENSOR: "buffer",
    }
    entries = []
    for spec in program.graph_signature.input_specs:
        source = program.state_dict if spec.target in program.state_dict else program.constants
        tensor = source.get(spec.target)
        if spec.kind in kinds and isinstance(tensor, Tensor):
            entries.append((spec.target, tensor, kinds[spec.kind]))
    tensors, metas = _eager(entries)
    return ModelFormat.EXPORT, program, metas, lambda name: tensors[name].to(device), None


def _load_pickle(file: Path, device: str, trust_pickle: bool) -> _Loaded:
    content = _torch_load(file, device, trust_pickle)
    if isinstance(content, dict):
        content = _unnest(content, file)
    if isinstance(content, nn.Module):
        assert trust_pickle, "weights_only=True never returns a module"
        return _from_module(content, ModelFormat.PICKLED_MODULE)
    if not isinstance(content, dict):
        raise FormatError(
            f"'{file}' holds a {type(content).__name__}, not a state dict",
            hint="Save the weights with torch.save(model.state_dict(), path).",
        )
    entries = []
    for name, value in content.items():
        if isinstance(name, str) and isinstance(value, Tensor):
            entries.append((name, value, "unknown"))
        else:
            logger.debug("ignoring the non-tensor entry %r (%s)", name, type(value).__name__)
    if not entries:
        raise FormatError(
            f"'{file}' holds a dict with no tensors",
            hint="Save the weights with torch.save(model.state_dict(), path).",
        )
    tensors, metas = _eager(entries, dedup=False)
    return ModelFormat.STATE_DICT, None, metas, tensors.__getitem__, None


def _torch_load(file: Path, device: str, trust_pickle: bool) -> Any:
    try:
        with _torch_source(file) as source:
            mmap = isinstance(source, Path) and zipfile.is_zipfile(file)
            return torch.load(source, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        unsafe = error
    except (RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise FormatError(f"'{file}' is a corrupt torch.save file: {_first_line(error)}") from error
    if not trust_pickle:
        found = refused_global(unsafe)
        what = (
            f"a pickled Python object (it refers to {found}), not plain weights"
            if found
            else f"a pickle that the safe weights-only unpickler cannot read ({_reason(unsafe)})"
        )
        raise UnsafeInputError(
            f"'{file}' is {what}: unpickling it fully can run arbitrary code",
            hint="If you trust this file, pass --trust-pickle (trust_pickle=True). " + _RESAVE,
        )
    logger.warning("unpickling %s with weights_only=False (trusted): this runs its code", file)
    try:
        with _torch_source(file) as source:
            return torch.load(source, map_location=device, weights_only=False)
    except Exception as error:  # a trusted pickle can fail in any imported code
        raise InputError(
            f"'{file}' could not be unpickled: {_first_line(error)}",
            hint="The classes it pickles must be importable: run bnnify from the project "
            "that defines them. " + _RESAVE,
        ) from error


@contextmanager
def _torch_source(file: Path) -> Iterator[Path | BinaryIO]:
    """The path for `torch.load` (memory-mappable), or a stream where it misreads the path.

    `torch.load` hands paths ending in ".safetensors" to safetensors.
    """
    if file.name.endswith(".safetensors"):
        with open(file, "rb") as stream:
            yield stream
    else:
        yield file


def _unnest(content: dict, file: Path) -> Any:
    """The state dict (or trusted module) inside a checkpoint dict."""
    if any(isinstance(value, Tensor) for value in content.values()):
        return content
    found = [
        key
        for key in _NESTED_KEYS
        if isinstance(content.get(key), nn.Module)
        or (
            isinstance(content.get(key), dict)
            and any(isinstance(v, Tensor) for v in content[key].values())
        )
    ]
    if len(found) != 1:
        keys = [str(key) for key in content][:20]
        raise FormatError(
            f"'{file}' holds a dict without tensors and {len(found)} nested state dicts "
            f"under {list(_NESTED_KEYS)}; its top-level keys are {keys}",
            hint="Save the weights themselves: torch.save(model.state_dict(), path).",
        )
    logger.debug("using the state dict under %r of %s", found[0], file)
    return content[found[0]]


def _load_safetensors(file: Path, device: str, trust_pickle: bool) -> _Loaded:
    reader = SafetensorsFile(file, "model file")
    metas = {name: _meta(info) for name, info in reader.infos.items()}
    return ModelFormat.SAFETENSORS, None, metas, lambda n: reader.tensor(n, device), None


def _load_sharded(file: Path, device: str, trust_pickle: bool) -> _Loaded:
    index = read_index(file)
    readers = {shard: SafetensorsFile(path, "shard") for shard, path in index.shards.items()}
    lacking = [n for n, shard in index.weight_map.items() if n not in readers[shard].infos]
    if lacking:
        raise FormatError(
            f"'{file}': the shards lack {len(lacking)} tensors the index maps to them: "
            f"{shorten(lacking[:5], 200)}",
            hint="The index and the shards come from different checkpoints: download them again.",
        )
    metas = {}
    for shard, reader in readers.items():
        for name, info in reader.infos.items():
            if index.weight_map.get(name) == shard:
                metas[name] = _meta(info)
            else:
                logger.debug("ignoring %r of shard %s: not in the index", name, shard)

    def fetch(name: str) -> Tensor:
        return readers[index.weight_map[name]].tensor(name, device)

    return ModelFormat.SHARDED, None, metas, fetch, None


def _meta(info: Any) -> TensorMeta:
    return TensorMeta(info.name, info.dtype, info.shape, "unknown")


# --------------------------------------------------------------------- helpers


def _from_module(module: nn.Module, fmt: ModelFormat) -> _Loaded:
    entries = [(n, t, "parameter") for n, t in module.named_parameters()]
    entries += [(n, t, "buffer") for n, t in module.named_buffers()]
    tensors, metas = _eager(entries)
    return fmt, module, metas, tensors.__getitem__, None


def _eager(
    entries: list[tuple[str, Tensor, str]], dedup: bool = True
) -> tuple[dict[str, Tensor], dict[str, TensorMeta]]:
    """Detached tensors and their metadata; with `dedup`, aliases of a tensor once."""
    tensors: dict[str, Tensor] = {}
    metas: dict[str, TensorMeta] = {}
    seen: set[tuple] = set()
    for name, tensor, kind in entries:
        key = alias_key(tensor)
        if dedup and key is not None and key in seen:
            logger.debug("%s is tied to an earlier tensor: listed once", name)
            continue
        seen.add(key)
        tensors[name] = tensor.detach()
        metas[name] = TensorMeta(name, tensor.dtype, tuple(tensor.shape), kind)
    return tensors, metas


def _reason(error: BaseException) -> str:
    """The weights-only unpickler's own reason, without torch's advice around it."""
    text = str(error)
    _, found, reason = text.partition("WeightsUnpickler error:")
    return _first_line(reason if found and reason.strip() else text)


def _first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else "no message"
    return line if isinstance(error, str) else f"{type(error).__name__}: {line}"
