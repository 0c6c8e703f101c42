"""The variational checkpoint: self-describing safetensors, one file or sharded.

Layout (format version 1), documented for other tools in `docs/format.md`:
tensors `<param>.mu` / `<param>.rho` (Gaussian posteriors; other posteriors store
their own state as `<param>.<name>`), `<param>.prior.<buffer>` for non-scalar prior
tensors (names made by `bnnify.bnn.keys`), `<name>` for every tensor kept
deterministic, and `bnnify.fit.*` tensors written by `bnnify fit`. The metadata (all
strings, JSON where structured) carries the format version, tool versions, source
file, resolved spec and the parameter map.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

import bnnify
from bnnify.bnn.keys import posterior_key, prior_key
from bnnify.bnn.posteriors import VariationalPosterior, restore_posterior
from bnnify.errors import FormatError, InputError
from bnnify.formats.detect import shard_path
from bnnify.formats.safetensors_io import (
    SafetensorsWriter,
    ShardedWriter,
    TensorInfo,
    read_header,
)
from bnnify.formats.spec import ConversionSpec

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "ParameterRecord",
    "TensorRecord",
    "checkpoint_metadata",
    "dtype_name",
    "write_tensors",
]

FORMAT = "bnnify.variational"
FORMAT_VERSION = "1"
_SUPPORTED = {"1"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class ParameterRecord:
    """A reparametrized parameter: its shape and dtype, and where its tensors are.

    Attributes:
        tensors: Posterior tensor role -> key in the file (`{"mu": "fc.weight.mu", ...}`).
        prior_tensors: Prior buffer -> key in the file (non-scalar prior tensors only).
        aliases: Every name of the (tied) parameter, its own name first.
    """

    name: str
    shape: list[int]
    dtype: str
    tensors: dict[str, str]
    prior_tensors: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["name"]
        return data


@dataclass
class TensorRecord:
    """A tensor kept as it is; `kind` is "parameter", "buffer" or "unknown"."""

    name: str
    kind: str
    shape: list[int]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": self.shape, "dtype": self.dtype}


def checkpoint_metadata(
    *,
    source: Mapping[str, Any],
    spec: ConversionSpec,
    parameters: Sequence[ParameterRecord],
    deterministic: Sequence[TensorRecord],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The metadata strings of a checkpoint (namespaced keys, JSON values)."""
    metadata = {
        "bnnify.format": FORMAT,
        "bnnify.format_version": FORMAT_VERSION,
        "bnnify.version": bnnify.__version__,
        "torch.version": torch.__version__,
        "bnnify.source": json.dumps(dict(source), sort_keys=True),
        "bnnify.spec": json.dumps(spec.to_json(), sort_keys=True),
        "bnnify.parameters": json.dumps({r.name: r.to_json() for r in parameters}),
        "bnnify.deterministic": json.dumps({r.name: r.to_json() for r in deterministic}),
    }
    for key, value in (extra or {}).items():
        metadata[f"bnnify.{key}"] = json.dumps(value, sort_keys=True)
    return metadata


def write_tensors(
    target: Path,
    infos: Sequence[TensorInfo],
    produce: Callable[[str], Tensor],
    metadata: Mapping[str, str],
    temp_path: Callable[[Path], Path],
    *,
    shard_bytes: int | None = None,
    stem: str | None = None,
) -> None:
    """Streams tensors into `target` (or shards under its folder) in storage order.

    `produce(key)` is called once per tensor, in the writer's order, so that only
    one tensor (or one parameter's tensors) is in memory at a time.
    """
    if shard_bytes is None:
        with open(temp_path(target), "wb") as file:
            writer = SafetensorsWriter(file, infos, metadata)
            for key in writer.order:
                writer.write(key, produce(key))
            writer.finish()
        return
    assert stem is not None
    with ShardedWriter(target.parent, stem, infos, metadata, shard_bytes) as writer:
        writer.temp_path = temp_path
        for key in writer.order:
            writer.write(key, produce(key))
        writer.finish()


def sharded_paths(
    target: Path, stem: str, infos: Sequence[TensorInfo], shard_bytes: int
) -> list[Path]:
    """Files a sharded checkpoint of `infos` will consist of (shards, then the index)."""
    return ShardedWriter(target.parent, stem, infos, None, shard_bytes).paths()


class Checkpoint:
    """A variational checkpoint opened for reading; tensors are memory-mapped lazily.

    Args:
        path: A checkpoint file, or the `.safetensors.index.json` of a sharded one.

    Raises:
        InputError: If the file is missing or unreadable.
        FormatError: If it is not a bnnify checkpoint of a supported format version.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"checkpoint {str(path)!r} does not exist")
        self.files: dict[str, Path] = {}
        self.metadata = self._read_metadata()
        self._check_format()
        try:
            spec = json.loads(self.metadata["bnnify.spec"])
            self.spec = ConversionSpec.from_json(spec, recorded=True)
            self.source: dict[str, Any] = json.loads(self.metadata["bnnify.source"])
            self.parameters = {
                name: ParameterRecord(name=name, **record)
                for name, record in json.loads(self.metadata["bnnify.parameters"]).items()
            }
            self.deterministic = {
                name: TensorRecord(name=name, **record)
                for name, record in json.loads(self.metadata["bnnify.deterministic"]).items()
            }
            self.fit: dict[str, Any] | None = (
                json.loads(self.metadata["bnnify.fit"]) if "bnnify.fit" in self.metadata else None
            )
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            raise FormatError(f"{self.path}: malformed bnnify metadata ({error})") from None

    def _read_metadata(self) -> dict[str, str]:
        if self.path.name.endswith(".index.json"):
            try:
                index = json.loads(self.path.read_text(encoding="utf-8"))
                metadata = dict(index["metadata"])
                weight_map = index["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise FormatError(f"{self.path}: not a valid checkpoint index ({error})") from None
            for key, shard in weight_map.items():
                # Confined to the index's folder; a missing shard is a FormatError.
                self.files[key] = shard_path(self.path, str(shard))
            return {k: str(v) for k, v in metadata.items()}
        metadata, infos = read_header(self.path)
        self.files = dict.fromkeys(infos, self.path)
        return metadata

    def _check_format(self) -> None:
        if self.metadata.get("bnnify.format") != FORMAT:
            found = self.metadata.get("bnnify.format")
            raise FormatError(
                f"{self.path} is not a bnnify variational checkpoint "
                f"(format {found!r}, expected {FORMAT!r})",
                hint="Create one with `bnnify convert MODEL`.",
            )
        version = self.metadata.get("bnnify.format_version")
        if version not in _SUPPORTED:
            raise FormatError(
                f"{self.path}: checkpoint format version {version!r} is not supported by "
                f"bnnify {bnnify.__version__} (supported: {', '.join(sorted(_SUPPORTED))})",
                hint="Upgrade bnnify, or convert the model again with this version.",
            )

    # -------------------------------------------------------------- tensors

    def keys(self) -> list[str]:
        return list(self.files)

    def tensor(self, key: str, device: str | torch.device = "cpu") -> Tensor:
        """One tensor of the file, by key."""
        path = self.files.get(key)
        if path is None:
            raise FormatError(f"{self.path}: no tensor {key!r} in the checkpoint")
        # A mapping per tensor: its pages go with the tensor instead of staying resident.
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return handle.get_tensor(key).to(device)

    def state_keys(self, *, priors: bool = True) -> dict[str, str]:
        """`BayesianModule.variational_state()` keys -> the keys of their tensors in the file."""
        keys = {}
        for name, record in self.parameters.items():
            keys.update({posterior_key(name, role): key for role, key in record.tensors.items()})
            if priors:
                keys.update({prior_key(name, b): key for b, key in record.prior_tensors.items()})
        return keys

    def variational_state(
        self, device: str | torch.device = "cpu", *, priors: bool = True
    ) -> dict[str, Tensor]:
        """`"<param>.<role>"` and (with `priors`) `"<param>.prior.<buffer>"` tensors."""
        return {
            state: self.tensor(key, device) for state, key in self.state_keys(priors=priors).items()
        }

    def posterior(self, name: str, device: str | torch.device = "cpu") -> VariationalPosterior:
        """The posterior of parameter `name`, rebuilt from its tensors."""
        record = self.parameters[name]
        state = {role: self.tensor(key, device) for role, key in record.tensors.items()}
        return restore_posterior(self.spec.posterior, state, next(iter(state.values())))

    def deterministic_state(self, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        return {name: self.tensor(name, device) for name in self.deterministic}

    def fit_tensors(self, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        return {k: self.tensor(k, device) for k in self.files if k.startswith("bnnify.fit.")}

    def num_elements(self) -> int:
        total = 0
        for record in self.parameters.values():
            count = 1
            for size in record.shape:
                count *= size
            total += count
        return total

    # ------------------------------------------------------------- modules

    def to_bayesian(
        self,
        module: nn.Module | None = None,
        *,
        prior: tuple[str, dict] | None = None,
        device: str | torch.device = "cpu",
    ) -> Any:
        """Loads the checkpoint into a `BayesianModule`.

        Args:
            module: The architecture (an `nn.Module` whose parameters have the
                recorded names). Without one, a module holding the tensors under their
                names is built: enough for the KL divergence and for running a model
                file with sampled weights.
            prior: A prior spec replacing the recorded one.
            device: Where to load the tensors.

        Raises:
            FormatError: If `module` does not match the checkpoint.
        """
        from bnnify.bnn import BayesianModule
        from bnnify.formats.tree import build_tree

        state = self.variational_state(device, priors=prior is None)
        deterministic = self.deterministic_state(device)
        if module is None:
            tensors = {name: self._placeholder(name, state) for name in self.parameters}
            tensors.update(deterministic)
            kept = [n for n, r in self.deterministic.items() if r.kind == "parameter"]
            module = build_tree(tensors, [*self.parameters, *kept])
        module.to(device)
        include = [glob.escape(alias) for r in self.parameters.values() for alias in r.aliases]
        bnn = BayesianModule(
            module,
            self.spec.posterior,
            prior if prior is not None else self.spec.prior,
            include=include or [glob.escape(n) for n in self.parameters],
        )
        bnn.load_variational_state(state, strict=prior is None)
        _load_deterministic(bnn.module, deterministic, self.path)
        return bnn

    def _placeholder(self, name: str, state: Mapping[str, Tensor]) -> Tensor:
        record = self.parameters[name]
        mu = state.get(posterior_key(name, "mu"))
        return (
            mu if mu is not None else torch.zeros(record.shape, dtype=getattr(torch, record.dtype))
        )

    def __enter__(self) -> Checkpoint:
        # Nothing stays open between reads: `with` only scopes the object.
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def _load_deterministic(module: nn.Module, tensors: Mapping[str, Tensor], path: Path) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise FormatError(
            f"{path}: the module does not match the checkpoint "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})",
            hint="Pass the architecture the checkpoint was converted from.",
        )
    module.load_state_dict(dict(tensors), strict=True)
