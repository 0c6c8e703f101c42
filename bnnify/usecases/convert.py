"""`convert`: a trained model in, a variational checkpoint and its KL report out."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from bnnify.enums import KLMethod
from bnnify.errors import ArgumentTypeError, InvalidArgumentError, UsageError
from bnnify.formats.atomic import AtomicOutputs, check_outputs
from bnnify.formats.checkpoint_writer import checkpoint_metadata, sharded_paths, write_tensors
from bnnify.formats.detect import resolve_model_path
from bnnify.formats.model_files import LoadedModel, ModelFormat
from bnnify.formats.report import KLReport, kl_total, write_report
from bnnify.formats.sharded import read_index
from bnnify.formats.spec import ConversionSpec, resolve_spec
from bnnify.usecases import LOGGER_NAME
from bnnify.usecases.conversion_plan import ConversionPlan, ParameterSummary, plan_conversion
from bnnify.usecases.kl_shares import (
    KLShare,
    buffer_like,
    exclude_flags,
    largest,
    warn_buffer_like,
)
from bnnify.usecases.sources import ModelLike, Progress, file_paths, opened_model

__all__ = [
    "ConversionResult",
    "KLShare",
    "ParameterSummary",
    "convert",
    "output_paths",
    "parse_size",
]

logger = logging.getLogger(LOGGER_NAME)

_OVERRIDES = (
    "posterior",
    "posterior_args",
    "prior",
    "prior_args",
    "device",
    "dtype",
    "include",
    "exclude",
    "only",
    "skip",
    "seed",
)


@dataclass
class ConversionResult:
    """What a conversion did: the parameters made Bayesian, their KL, the files written."""

    source: dict[str, Any]
    spec: ConversionSpec
    parameters: list[ParameterSummary]
    deterministic: list[str]
    method: KLMethod
    samples: int | None
    outputs: list[Path] = field(default_factory=list)
    buffer_like: list[KLShare] = field(default_factory=list)
    suggested_exclude: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def top(self) -> list[KLShare]:
        """The parameters carrying the most KL (at most `TOP`), largest first."""
        return largest(self.parameters)

    @property
    def elements(self) -> int:
        """Number of reparametrized weight elements."""
        return sum(p.numel for p in self.parameters)

    @property
    def kl_sum(self) -> float:
        """KL(posterior || prior) summed over every element (exactly rounded)."""
        return kl_total(p.kl for p in self.parameters)

    @property
    def kl_mean(self) -> float:
        """The KL per element."""
        return self.kl_sum / self.elements if self.elements else 0.0

    def to_json(self) -> dict[str, Any]:
        """The result as `bnnify convert --json` prints it."""
        return {
            "source": self.source,
            "spec": self.spec.to_json(),
            "reparametrized": len(self.parameters),
            "deterministic": list(self.deterministic),
            "variational_elements": self.elements,
            "kl": {
                "sum": self.kl_sum,
                "mean": self.kl_mean,
                "method": self.method.value,
                "samples": self.samples,
            },
            "largest": [share.to_json() for share in self.top],
            "buffer_like": [share.to_json() for share in self.buffer_like],
            "suggested_exclude": list(self.suggested_exclude),
            "outputs": [str(p) for p in self.outputs],
            "dry_run": self.dry_run,
            "parameters": [
                {
                    "name": p.name,
                    "shape": p.shape,
                    "elements": p.numel,
                    "dtype": p.dtype,
                    "sigma_init": p.sigma_mean,
                    "kl": p.kl,
                }
                for p in self.parameters
            ],
        }


def convert(
    model: ModelLike,
    spec: str | Path | ConversionSpec | dict[str, Any] | None = None,
    *,
    output: str | Path | None = None,
    report: str | Path | None = None,
    force: bool = False,
    mc_samples: int | None = None,
    shard_size: int | str | None = None,
    trust_pickle: bool = False,
    key: str | None = None,
    progress: Progress | None = None,
    arch: str | None = None,
    arch_kwargs: str | Mapping[str, Any] | None = None,
    dry_run: bool = False,
    **overrides: Any,
) -> ConversionResult:
    """Converts a trained model into a variational checkpoint and a KL report, atomically.

    Args:
        model: A model file of any supported format (see `load_model`), a sharded
            checkpoint's folder or index, a `LoadedModel`, or an `nn.Module` (left
            unchanged; give `output`).
        spec: A YAML spec file, a spec document (a dict), a `ConversionSpec`, or None
            for the defaults (pretrained Gaussian posterior, N(0, 1) prior).
        output: The checkpoint [default: `<stem>.bnn.safetensors` here].
        report: The KL report [default: `<stem>.kl.safetensors` beside `output`].
        force: Overwrite existing outputs.
        mc_samples: Monte Carlo samples per element for the KL (default: the closed
            form when known, else 16).
        shard_size: Write a sharded checkpoint with shards up to this many bytes (or
            a size such as "2GB"); default for sharded inputs: their largest shard.
        trust_pickle: Load a pickled `nn.Module` file (this runs its code).
        key: In a torch.save checkpoint dict, the dotted path of the state dict
            ("model.state_dict", "ema"); by default it is found (see `find_state_dict`).
            The key used is recorded in the checkpoint's source (`fit` and `predict`
            read the model file with it).
        progress: Called with (elements done, total elements) as tensors are written.
        arch: Confirms the spec's `arch` (building it runs its code); see `confirm_arch`.
        arch_kwargs: Confirms the spec's `arch_kwargs` (a JSON object or a mapping).
        dry_run: Plan the conversion and compute the KL, but write nothing (the result's
            `outputs` is empty).
        **overrides: Spec keys overriding `spec`, as `resolve_spec` takes them:
            `posterior`, `prior` (a name or `(name, kwargs)`), `posterior_args`,
            `prior_args` (dicts merged over the spec's), `device`, `dtype`, `include`,
            `exclude`, `only`, `skip` (module kinds, e.g. "linear,conv"), `seed`.

    Returns:
        The parameters reparametrized, their KL and the files written.

    Raises:
        SpecError: For an invalid spec or override, or `arch` given for a program file.
        UsageError: If an output is one of the files read (the model, its shards, the
            spec), `force` or not, or its folder cannot take it.
        OutputExistsError: If an output exists and `force` is false.
        InputError: If the model cannot be read (`FormatError` if malformed).
        UnsafeInputError: If the model needs unpickling and `trust_pickle` is false, or
            `arch` and `arch_kwargs` do not confirm the spec's.
    """
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise ArgumentTypeError(
            f"convert() got unknown options {unknown}", hint=f"Options: {', '.join(_OVERRIDES)}."
        )
    resolved = resolve_spec(spec, **overrides)
    in_memory = isinstance(model, nn.Module) or (
        isinstance(model, LoadedModel) and model.format is ModelFormat.MODULE
    )
    if in_memory and output is None:
        raise UsageError(
            "a module in memory has no file name to derive the outputs' from",
            hint="Give the checkpoint's path: output=...",
        )
    named = model.path if isinstance(model, LoadedModel) else Path(str(model))
    checkpoint, report_path = output_paths(Path("module") if in_memory else named, output, report)
    # The model (its files: a folder's, an index's shards) and the spec are never written onto.
    read = file_paths(model, *([spec] if isinstance(spec, (str, Path)) else []))
    # Before loading: existence is checked once the outputs are known (sharded or not).
    check_outputs([checkpoint, report_path], force=True, inputs=read)
    shard_bytes = None if shard_size is None else parse_size(shard_size)
    with opened_model(model, trust_pickle=trust_pickle, key=key) as loaded:
        logger.info(
            "Loaded %s (%s%s, %d tensors)",
            loaded.path,
            loaded.format.value,
            _where(loaded),
            len(loaded),
        )
        sharded = (ModelFormat.SHARDED, ModelFormat.SHARDED_STATE_DICT)
        if shard_bytes is None and loaded.format in sharded:
            shard_bytes = _largest_shard(loaded)
        return _convert(
            loaded,
            resolved,
            checkpoint,
            report_path,
            force,
            mc_samples,
            shard_bytes,
            progress,
            read=read,
            confirmation=(arch, arch_kwargs),
            dry_run=dry_run,
        )


def _convert(
    model: LoadedModel,
    spec: ConversionSpec,
    checkpoint: Path,
    report: Path,
    force: bool,
    mc_samples: int | None,
    shard_bytes: int | None,
    progress: Progress | None,
    *,
    read: list[Path],
    confirmation: tuple[str | None, str | Mapping[str, Any] | None],
    dry_run: bool,
) -> ConversionResult:
    stem = checkpoint.name.removesuffix(".safetensors").removesuffix(".safetensors.index.json")
    # Fail before any work on outputs that exist (without force) or cannot be written.
    index = checkpoint.parent / f"{stem}.safetensors.index.json"
    if not dry_run:
        early = [checkpoint if shard_bytes is None else index, report]
        AtomicOutputs(early, force=force, inputs=read)
    source = {"name": model.path.name, "format": model.format.value, "sha256": model.sha256}
    # Where the weights were inside the file: `fit` and `predict` read them there again.
    source |= {k: v for k, v in (("key", model.key), ("prefix", model.prefix)) if v is not None}
    arch, arch_kwargs = confirmation
    plan = plan_conversion(model, spec, mc_samples, progress, arch=arch, arch_kwargs=arch_kwargs)
    metadata = checkpoint_metadata(
        source=source, spec=spec, parameters=plan.parameters, deterministic=plan.deterministic
    )
    targets = [checkpoint]
    if shard_bytes is not None:
        targets = sharded_paths(checkpoint, stem, plan.infos, shard_bytes)
    if dry_run:
        for info in plan.infos:  # every tensor made, as the writer would, then dropped
            plan.produce(info.name)
    else:
        with AtomicOutputs([*targets, report], force=force, inputs=read) as outputs:
            write_tensors(
                checkpoint,
                plan.infos,
                plan.produce,
                metadata,
                outputs.temp,
                shard_bytes=shard_bytes,
                stem=stem,
            )
            write_report(_report(plan, spec, targets[-1].name, model.sha256), outputs.temp(report))
    parameters = plan.summary()
    # Only a file that does not say what is a buffer can have a buffer made Bayesian.
    unknown = spec.arch is None and model.module_types() is None
    suspects = buffer_like(parameters) if unknown else []
    flags = exclude_flags(suspects, [p.name for p in parameters])
    warn_buffer_like(suspects, flags, model.path.name)
    return ConversionResult(
        source=source,
        spec=spec,
        parameters=parameters,
        deterministic=[r.name for r in plan.deterministic],
        method=plan.method,
        samples=plan.samples,
        outputs=[] if dry_run else [*targets, report],
        buffer_like=suspects,
        suggested_exclude=flags,
        dry_run=dry_run,
    )


def _where(loaded: LoadedModel) -> str:
    """Where the weights were in a checkpoint dict, as the log line says it."""
    where = f", the state dict under {loaded.key!r}" if loaded.key else ""
    if loaded.prefix:
        where += f", {loaded.prefix!r} removed from every name"
    return where


def _report(plan: ConversionPlan, spec: ConversionSpec, name: str, sha256: str) -> KLReport:
    parameters = plan.summary()
    return KLReport(
        names=[p.name for p in parameters],
        per_parameter=[p.kl for p in parameters],
        numels=[p.numel for p in parameters],
        method=plan.method,
        samples=plan.samples,
        posterior={"name": spec.posterior[0], "kwargs": dict(spec.posterior[1])},
        prior={"name": spec.prior[0], "kwargs": dict(spec.prior[1])},
        checkpoint={"name": name, "source_sha256": sha256},
    )


def _largest_shard(loaded: LoadedModel) -> int:
    return max(f.stat().st_size for f in read_index(resolve_model_path(loaded.path)).files)


def output_paths(
    model_path: Path, checkpoint: str | Path | None, report: str | Path | None
) -> tuple[Path, Path]:
    """Default outputs: `<stem>.bnn.safetensors` and `<stem>.kl.safetensors` here.

    The stem is the file name without its last extension.

    With only the checkpoint given, the report goes beside it: `x.bnn.safetensors`
    gives `x.kl.safetensors`, any other name `<name>.kl.safetensors`.
    """
    stem = _stem(Path(model_path))
    if checkpoint is None:
        return Path(f"{stem}.bnn.safetensors"), Path(report or f"{stem}.kl.safetensors")
    checkpoint = Path(checkpoint)
    if report is None:
        name = checkpoint.name
        for suffix in (".bnn.safetensors", ".safetensors.index.json", ".safetensors"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        report = checkpoint.with_name(f"{name}.kl.safetensors")
    return checkpoint, Path(report)


# Endings dropped from the outputs' names (weight files, torch.export's .pt2); any other
# ending (x.jit, x.ts) stays, so that x.jit and x.pt2 get two default outputs.
_WEIGHT_SUFFIXES = (".pt", ".pth", ".pt2", ".safetensors", ".bin", ".ckpt")


def _stem(model_path: Path) -> str:
    """`model` for model.pt and model.pt2, model.state_dict for model.state_dict.pt,
    `x.jit` for x.jit, the folder's name."""
    name = model_path.name
    if model_path.is_dir():
        return name
    for suffix in (".safetensors.index.json", ".bin.index.json", ".index.json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    if Path(name).suffix.lower() in _WEIGHT_SUFFIXES:
        return Path(name).stem or name
    return name


_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9}
_UNITS |= {"GB": 10**9, "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from a count or a size such as "2GB", "500MiB" or "1048576".

    Raises:
        InvalidArgumentError: If `size` is not a size of at least one byte.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        number = float(size)
    else:
        raw = str(size).strip().upper().replace(" ", "")
        digits = raw.rstrip("KMGTIB")
        try:
            number = float(digits) * _UNITS[raw[len(digits) :]]
        except (ValueError, KeyError):
            number = 0.0
    if not (math.isfinite(number) and number >= 1):
        # A usage error (exit 2), like any other invalid argument.
        raise InvalidArgumentError(
            f"--shard-size: {str(size)!r} is not a size such as 2GB or 500MiB",
            hint="Units: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB (powers of 1024).",
        )
    return int(number)
