"""Saved models in every supported format, recognized by their content, with lazy tensor access."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export.graph_signature import InputKind

from bnnify.bnn.kinds import module_types
from bnnify.errors import (
    ArgumentTypeError,
    BnnifyError,
    FormatError,
    InvalidArgumentError,
    UnknownNameError,
    UsageError,
    closest,
)
from bnnify.formats.detect import ModelFormat, detect_format, resolve_model_path, sha256_file
from bnnify.formats.export_archive import load_export
from bnnify.formats.export_inputs import module_types as export_module_types
from bnnify.formats.safetensors_io import SafetensorsWriter, TensorInfo
from bnnify.formats.state_dicts import (
    load_safetensors,
    load_sharded,
    load_torch_save,
    refuse_key,
)
from bnnify.formats.tensor_meta import Loaded, TensorMeta, eager_tensors
from bnnify.formats.ties import find_ties

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
        key: Where the state dict was in a torch.save checkpoint dict (a dotted path
            such as "model.state_dict"); None for the top level and other formats.
        prefix: The wrapper prefix ("module.") removed from every tensor name, or None.
    """

    def __init__(self, path: Path, sha256: str, loaded: Loaded):
        self.path = path
        self.format: ModelFormat = loaded.format
        self.sha256 = sha256
        self.module = loaded.module
        self.key = loaded.key
        self.prefix = loaded.prefix
        self._metas = loaded.metas
        self._fetch: Callable[[str], Tensor] | None = loaded.fetch
        self._close = loaded.close

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

    def module_types(self) -> dict[str, str] | None:
        """Each module's path ("" for the model) and its class's qualified name, if known.

        TorchScript archives, torch.export programs (the modules whose forward the
        export traced) and modules say which module holds each parameter and of what
        class ("torch.nn.modules.linear.Linear"); state dicts, safetensors and sharded
        checkpoints do not: None.
        """
        if self.format is ModelFormat.EXPORT:
            return export_module_types(self.module)
        if isinstance(self.module, nn.Module):
            return module_types(self.module)
        return None

    def ties(self) -> dict[str, str]:
        """Tensors sharing an earlier one's memory (tied weights) -> its name.

        Only a state dict (one file or shards) lists tied tensors under each name: the
        formats that hold a module list each distinct tensor once, and safetensors files
        cannot tie.
        """
        if self.format not in (ModelFormat.STATE_DICT, ModelFormat.SHARDED_STATE_DICT):
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


def load_model(
    path: str | Path,
    *,
    device: str = "cpu",
    trust_pickle: bool = False,
    key: str | None = None,
) -> LoadedModel:
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
    - `torch.save` files load with `weights_only=True`, the classes of
      `bnnify.formats.safe_unpickle.ALLOWED` (hyperparameters of training checkpoints)
      read as inert stand-ins; one needing more (a pickled whole `nn.Module`, other
      objects) raises `UnsafeInputError` unless `trust_pickle`, which reloads it with
      `weights_only=False` (this can run arbitrary code). The state dict is found inside
      a checkpoint dict (`bnnify.formats.nesting.find_state_dict`), or chosen by `key`.
    - safetensors files hold data only; sharded checkpoints are safetensors shards or
      torch.save shards (loaded as above, without stand-ins' leniency for structure).

    Args:
        path: A file, a sharded checkpoint's index file, or a Hugging Face folder
            (see `resolve_model_path`).
        device: Where tensors are placed (`tensor()` moves those of an export program).
        trust_pickle: Allow full unpickling of files that need it (trusted files only).
        key: For a torch.save checkpoint dict, the dotted path of its state dict
            ("model.state_dict"); by default it is found (see `find_state_dict`).

    Returns:
        The loaded model; close it (or use `with`) to release memory maps.

    Raises:
        InputError: If `path` does not exist or a trusted pickle fails to load.
        FormatError: If the content is not a supported format or is inconsistent, or
            a checkpoint dict holds no state dict or several (without `key`).
        UnsafeInputError: If loading needs arbitrary code and `trust_pickle` is False.
        InvalidArgumentError: If `device` is not a device name.
        UsageError: If `key` is given for a format other than torch.save, or names
            nothing in the checkpoint (`UnknownNameError`).
    """
    if key is not None and (not isinstance(key, str) or not key):
        raise InvalidArgumentError(
            f"key must be a non-empty dotted path such as 'model.state_dict', got {key!r}"
        )
    file = resolve_model_path(path)
    fmt = detect_format(file)
    device = _device(device)
    digest = sha256_file(path)
    if fmt is not ModelFormat.STATE_DICT:
        refuse_key(fmt, key)
    if fmt is ModelFormat.TORCHSCRIPT:
        loaded = _load_torchscript(file, device)
    elif fmt is ModelFormat.EXPORT:
        loaded = _load_export(file, device, trust_pickle)
    elif fmt is ModelFormat.STATE_DICT:
        loaded = load_torch_save(file, device, trust_pickle, key)
    elif fmt is ModelFormat.SAFETENSORS:
        loaded = load_safetensors(file, device)
    else:
        loaded = load_sharded(file, device)
    logger.info(
        "loaded %s: %s, %d tensors, sha256 %s", path, loaded.format.value, len(loaded.metas), digest
    )
    return LoadedModel(Path(path), digest, loaded)


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
    path = Path(f"<{type(module).__name__}>")
    return LoadedModel(path, digest.hexdigest(), _from_module(module, ModelFormat.MODULE))


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


def _load_torchscript(file: Path, device: str) -> Loaded:
    try:
        module = torch.jit.load(str(file), map_location=device)
    except RuntimeError as error:
        raise FormatError(
            f"'{file}' is a corrupt TorchScript archive: {_first_line(error)}"
        ) from error
    return _from_module(module, ModelFormat.TORCHSCRIPT)


def _load_export(file: Path, device: str, trust_pickle: bool) -> Loaded:
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
    tensors, metas = eager_tensors(entries)
    return Loaded(ModelFormat.EXPORT, program, metas, lambda name: tensors[name].to(device))


def _from_module(module: nn.Module, fmt: ModelFormat) -> Loaded:
    entries = [(n, t, "parameter") for n, t in module.named_parameters()]
    entries += [(n, t, "buffer") for n, t in module.named_buffers()]
    tensors, metas = eager_tensors(entries)
    return Loaded(fmt, module, metas, tensors.__getitem__)


def _first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else "no message"
    return line if isinstance(error, str) else f"{type(error).__name__}: {line}"
