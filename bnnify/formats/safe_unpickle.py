"""`torch.load` with `weights_only=True`, and inert stand-ins for an allow-list of harmless classes.

Training checkpoints (Lightning's `.ckpt`, pyannote's `pytorch_model.bin`) keep their
hyperparameters beside the weights as Python objects: OmegaConf configs, `argparse`
namespaces, Lightning's `AttributeDict`, small task descriptions. The weights-only
unpickler refuses any class it does not know, so such a file used to be refused whole.

`torch_load` lets it through the same weights-only unpickler with one addition, scoped
to the call (`torch.serialization.safe_globals`): each name of `ALLOWED` is bound to a
stand-in defined here, never to the real class, which is not imported (it need not be
installed). The unpickler may create a stand-in (`NEWOBJ`, `REDUCE`) and set its state
(`BUILD`); a stand-in keeps nothing and runs nothing, and the dict-like ones become a
plain empty `dict` that the unpickler may fill. No name of the file reaches an import or
a call of real code, so nothing from the file executes. The objects they replace are
hyperparameters and metadata, dropped once the state dict is found: only tensors are read.
Any other class still stops the load (`UnsafeInputError`, unless `--trust-pickle`).
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

from bnnify.errors import FormatError, InputError, UnsafeInputError
from bnnify.formats.detect import refused_global

__all__ = ["ALLOWED", "RESAVE", "StandIn", "stand_ins_in", "torch_load"]

logger = logging.getLogger("bnnify")

# Qualified name -> why an object of it is harmless to replace and drop.
ALLOWED: dict[str, str] = {
    # Hyperparameter containers of Lightning (`save_hyperparameters`) and argparse.
    "pytorch_lightning.utilities.parsing.AttributeDict": "Lightning hyperparameters (a dict)",
    "lightning_fabric.utilities.data.AttributeDict": "Lightning hyperparameters (a dict)",
    "lightning.fabric.utilities.data.AttributeDict": "Lightning hyperparameters (a dict)",
    "argparse.Namespace": "command-line arguments kept as hyperparameters",
    "collections.defaultdict": "a dict (its default factory is not kept)",
    # OmegaConf / Hydra configurations kept as hyperparameters, and their node types.
    "omegaconf.dictconfig.DictConfig": "an OmegaConf configuration",
    "omegaconf.listconfig.ListConfig": "an OmegaConf configuration",
    "omegaconf.base.ContainerMetadata": "OmegaConf metadata",
    "omegaconf.base.Metadata": "OmegaConf metadata",
    "omegaconf.nodes.AnyNode": "an OmegaConf value",
    "omegaconf.nodes.StringNode": "an OmegaConf value",
    "omegaconf.nodes.IntegerNode": "an OmegaConf value",
    "omegaconf.nodes.FloatNode": "an OmegaConf value",
    "omegaconf.nodes.BooleanNode": "an OmegaConf value",
    # pyannote.audio's task description, saved in its Lightning checkpoints.
    "pyannote.audio.core.model.Introspection": "pyannote.audio model metadata",
    "pyannote.audio.core.task.Problem": "pyannote.audio task metadata",
    "pyannote.audio.core.task.Resolution": "pyannote.audio task metadata",
    "pyannote.audio.core.task.Specifications": "pyannote.audio task metadata",
    # Versions and paths recorded as metadata.
    "torch.torch_version.TorchVersion": "a version string",
    "pathlib.PosixPath": "a path recorded as metadata",
    "pathlib.WindowsPath": "a path recorded as metadata",
    # Types stored as values (OmegaConf records `object_type`, `key_type`): never called.
    "typing.Any": "a type annotation",
    "builtins.dict": "a type recorded as metadata",
    "builtins.list": "a type recorded as metadata",
    "builtins.int": "a type recorded as metadata",
    "builtins.float": "a type recorded as metadata",
    "builtins.str": "a type recorded as metadata",
    "builtins.bool": "a type recorded as metadata",
}
# Pickled by filling the object with dict items (SETITEMS), which the unpickler allows
# only on a plain dict: their stand-in is a new, empty dict.
_DICT_LIKE = {
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
    "collections.defaultdict",
}


class StandIn:
    """An inert object in place of an allow-listed class: keeps no state, runs nothing."""

    __slots__ = ()
    qualified_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        pass  # dropped: the state may hold anything, and nothing here uses it

    def __repr__(self) -> str:
        return f"<stand-in for {self.qualified_name}>"


class _DictStandIn(StandIn):
    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return {}


def _stand_in(name: str) -> type:
    base = _DictStandIn if name in _DICT_LIKE else StandIn
    return type(f"StandIn[{name}]", (base,), {"__slots__": (), "qualified_name": name})


_STAND_INS = {name: _stand_in(name) for name in ALLOWED}


def torch_load(file: Path, device: str, trust_pickle: bool, what: str = "torch.save file") -> Any:
    """The content of a `torch.save` file, weights-only with the stand-ins of `ALLOWED`.

    Zip files are memory-mapped. With `trust_pickle`, a file the weights-only unpickler
    refuses is loaded again with full unpickling (this can run arbitrary code).

    Raises:
        FormatError: The file is corrupt.
        UnsafeInputError: It needs another class and `trust_pickle` is false.
        InputError: A trusted pickle fails to load.
    """
    try:
        with _torch_source(file) as source, _allowed():
            mmap = isinstance(source, Path) and zipfile.is_zipfile(file)
            return torch.load(source, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        unsafe = error
    except (
        RuntimeError,
        EOFError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        zipfile.BadZipFile,
    ) as error:  # the weights-only unpickler's own failures on a malformed file
        raise FormatError(f"'{file}' is a corrupt {what}: {_first_line(error)}") from error
    if not trust_pickle:
        raise _unsafe(file, unsafe)
    logger.warning("unpickling %s with weights_only=False (trusted): this runs its code", file)
    try:
        with _torch_source(file) as source:
            return torch.load(source, map_location=device, weights_only=False)
    except Exception as error:  # a trusted pickle can fail in any imported code
        raise InputError(
            f"'{file}' could not be unpickled: {_first_line(error)}",
            hint="The classes it pickles must be importable: run bnnify from the project "
            "that defines them. " + RESAVE,
        ) from error


RESAVE = (
    "Better, re-save it without pickled objects: torch.save(model.state_dict(), path), "
    "torch.jit.save(torch.jit.script(model), path) or "
    "torch.export.save(torch.export.export(model, args), path)."
)


def stand_ins_in(content: Any, limit: int = 100_000) -> list[str]:
    """The allow-listed classes replaced in `content` (a bounded walk), sorted."""
    found: set[str] = set()
    stack, seen = [content], 0
    while stack and seen < limit:
        item = stack.pop()
        seen += 1
        if isinstance(item, StandIn) or (isinstance(item, type) and issubclass(item, StandIn)):
            found.add(item.qualified_name)
        elif isinstance(item, dict):
            stack += item.values()
        elif isinstance(item, (list, tuple)):
            stack += item
    return sorted(found)


@contextmanager
def _allowed() -> Iterator[None]:
    # `(object, "qualified.name")` entries appeared in torch 2.6: before, nothing is
    # allowed beyond torch's own list, and such checkpoints stay refused.
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 6):
        yield
        return
    with torch.serialization.safe_globals([(c, n) for n, c in _STAND_INS.items()]):
        yield


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


def _unsafe(file: Path, error: BaseException) -> UnsafeInputError:
    found = refused_global(error)
    what = (
        f"a pickled Python object (it refers to {found}, which is not on bnnify's list of "
        "harmless hyperparameter types), not plain weights"
        if found
        else f"a pickle that the safe weights-only unpickler cannot read ({_reason(error)})"
    )
    return UnsafeInputError(
        f"'{file}' is {what}: unpickling it fully can run arbitrary code",
        hint="If you trust this file, pass --trust-pickle (trust_pickle=True). " + RESAVE,
    )


def _reason(error: BaseException) -> str:
    """The weights-only unpickler's own reason, without torch's advice around it."""
    text = str(error)
    _, found, reason = text.partition("WeightsUnpickler error:")
    return _first_line(reason if found and reason.strip() else text)


def _first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else "no message"
    return line if isinstance(error, str) else f"{type(error).__name__}: {line}"
