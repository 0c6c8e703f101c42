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
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnnify.bnn.keys import posterior_key, prior_key
from bnnify.bnn.posteriors import VariationalPosterior, restore_posterior
from bnnify.errors import BnnifyError, FormatError, shorten
from bnnify.formats.checkpoint_checks import (
    LOG_NOISE_KEY,
    check_log_noise,
    check_parameter,
    check_spread,
    check_tensor,
    parse_dtype,
    record_fields,
    require_finite,
)
from bnnify.formats.checkpoint_header import (
    FORMAT,
    FORMAT_VERSION,
    check_format,
    checkpoint_in,
    metadata_json,
    string_metadata,
)
from bnnify.formats.detect import describe
from bnnify.formats.input_file import open_regular, regular_file
from bnnify.formats.safetensors_io import TensorInfo
from bnnify.formats.safetensors_reader import SafetensorsFile, looks_like_safetensors
from bnnify.formats.sharded import read_index
from bnnify.formats.spec import ConversionSpec

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "ParameterRecord",
    "TensorRecord",
    "dtype_name",
]


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


class Checkpoint:
    """A variational checkpoint opened for reading; tensors are read lazily.

    Opening checks the file against its own metadata: every posterior role the recorded
    posterior has (and no other), every non-scalar prior buffer, every kept tensor, each
    present with the shape and dtype the metadata implies. Posterior, prior and fit
    tensors are checked to be finite as they are read.

    Args:
        path: A checkpoint file, the `.safetensors.index.json` of a sharded one, or the
            folder holding either (see `checkpoint_in`).

    Raises:
        InputError: If the file is missing, unreadable or not a regular file.
        FormatError: If it is not a bnnify checkpoint of a supported format version, or
            its tensors do not match its metadata.
        UnsafeInputError: If a shard lies outside the index's folder.
    """

    def __init__(self, path: str | Path):
        self.path = checkpoint_in(path)
        regular_file(self.path, "checkpoint")
        self._readers: dict[Path, SafetensorsFile] = {}
        self.files: dict[str, Path] = {}
        self._kind = "a safetensors file"
        metadata = self._read_metadata()
        self._check_format(metadata)
        self.metadata = string_metadata(metadata, str(self.path))
        source = str(self.path)
        spec = metadata_json(self.metadata, "bnnify.spec", source, dict)
        try:
            self.spec = ConversionSpec.from_json(spec, recorded=True)
        except BnnifyError as error:
            raise FormatError(f"{source}: malformed bnnify metadata ({error.message})") from None
        self.source: dict[str, Any] = metadata_json(self.metadata, "bnnify.source", source, dict)
        self.parameters = {
            name: ParameterRecord(**record_fields(name, record, "parameter", source))
            for name, record in metadata_json(
                self.metadata, "bnnify.parameters", source, dict
            ).items()
        }
        self.deterministic = {
            name: TensorRecord(**record_fields(name, record, "tensor", source))
            for name, record in metadata_json(
                self.metadata, "bnnify.deterministic", source, dict
            ).items()
        }
        self.fit: dict[str, Any] | None = (
            metadata_json(self.metadata, "bnnify.fit", source, dict)
            if "bnnify.fit" in self.metadata
            else None
        )
        self._check_tensors()

    def _read_metadata(self) -> dict[str, Any]:
        with open_regular(self.path, "checkpoint") as stream:
            head = stream.read(16)
            size = os.fstat(stream.fileno()).st_size
        if looks_like_safetensors(head, size):
            reader = SafetensorsFile(self.path, "checkpoint")
            self._readers[self.path] = reader
            self.files = dict.fromkeys(reader.infos, self.path)
            return reader.metadata
        if not head.lstrip().startswith(b"{"):
            what = describe(self.path) or "not a safetensors file"
            raise FormatError(
                f"'{self.path}' is not a bnnify checkpoint ({what}): run `bnnify convert` first",
                hint="bnnify kl, inspect, fit and predict read the checkpoints `bnnify convert` "
                "writes (*.bnn.safetensors, or the index of a sharded one).",
            )
        index = read_index(self.path)
        self._readers = {f: SafetensorsFile(f, "checkpoint shard") for f in index.shards.values()}
        self.files = {key: index.file_of(key) for key in index.weight_map}
        for key, file in self.files.items():
            if key not in self._readers[file].infos:
                raise FormatError(
                    f"'{self.path}' maps tensor {shorten(key)} to shard "
                    f"{shorten(index.weight_map[key])}, which does not hold it",
                    hint="The index and its shards come from different checkpoints.",
                )
        self._kind = "a sharded safetensors index"
        return index.metadata

    def _check_format(self, metadata: dict[str, Any]) -> None:
        check_format(metadata, self.path, self._kind)

    def _check_tensors(self) -> None:
        infos = {key: self.tensor_info(key) for key in self.files}
        for name, record in self.parameters.items():
            check_parameter(record, self.spec, infos, f"{self.path}: parameter {shorten(name)}")
        for name, record in self.deterministic.items():
            dtype = parse_dtype(record.dtype, str(self.path))
            check_tensor(name, infos.get(name), record.shape, dtype, str(self.path))

    def tensor_info(self, key: str) -> TensorInfo:
        """The name, dtype and shape of one tensor of the file, from its header."""
        return self._readers[self.files[key]].infos[key]

    # -------------------------------------------------------------- tensors

    def keys(self) -> list[str]:
        return list(self.files)

    def tensor(self, key: str, device: str | torch.device = "cpu") -> Tensor:
        """One tensor of the file, by key, as stored (not checked for finiteness)."""
        path = self.files.get(key)
        if path is None:
            raise FormatError(f"{self.path}: no tensor {shorten(key)} in the checkpoint")
        return self._readers[path].tensor(key, device)

    def posterior_state(self, name: str, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """Role -> tensor of parameter `name`'s posterior (`mu`, `rho`...), checked finite."""
        record = self.parameters[name]
        state = {role: self._finite(key, device) for role, key in record.tensors.items()}
        if "rho" in state and "mu" in state:  # a Gaussian: sigma = softplus(rho) > 0
            check_spread(state["rho"], record.tensors["rho"], str(self.path))
        return state

    def prior_state(self, name: str, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """Buffer -> tensor of parameter `name`'s recorded prior, checked finite."""
        record = self.parameters[name]
        return {buffer: self._finite(key, device) for buffer, key in record.prior_tensors.items()}

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
        """`"<param>.<role>"` and (with `priors`) `"<param>.prior.<buffer>"` tensors, checked."""
        state = {}
        for name in self.parameters:
            for role, tensor in self.posterior_state(name, device).items():
                state[posterior_key(name, role)] = tensor
            if priors:
                for buffer, tensor in self.prior_state(name, device).items():
                    state[prior_key(name, buffer)] = tensor
        return state

    def posterior(self, name: str, device: str | torch.device = "cpu") -> VariationalPosterior:
        """The posterior of parameter `name`, rebuilt from its tensors (checked finite)."""
        state = self.posterior_state(name, device)
        return restore_posterior(self.spec.posterior, state, next(iter(state.values())))

    def deterministic_state(self, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        return {name: self.tensor(name, device) for name in self.deterministic}

    def fit_tensors(self, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """The `bnnify.fit.*` tensors, checked (finite; the log noise a usable scalar)."""
        tensors = {k: self._finite(k, device) for k in self.files if k.startswith("bnnify.fit.")}
        if LOG_NOISE_KEY in tensors:
            tensors[LOG_NOISE_KEY] = check_log_noise(tensors[LOG_NOISE_KEY], str(self.path))
        return tensors

    def _finite(self, key: str, device: str | torch.device) -> Tensor:
        return require_finite(self.tensor(key, device), key, str(self.path))

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
        if mu is not None:
            return mu
        return torch.zeros(record.shape, dtype=parse_dtype(record.dtype, str(self.path)))

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
