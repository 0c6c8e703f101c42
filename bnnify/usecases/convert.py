"""Converts a loaded model file into a variational checkpoint and its KL report.

Without an architecture the conversion is tensor-wise and streamed: each tensor is
read (memory-mapped for safetensors), its posterior and prior built, its KL computed
and its tensors written before the next one is touched. With `arch` the state dict
is loaded strictly into the named `nn.Module` and the `BayesianModule` path runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bnnify.bnn import BayesianModule, PosteriorFactory, get_posterior, get_prior
from bnnify.bnn.collect import matches
from bnnify.bnn.kl import DEFAULT_MC_SAMPLES, default_samples
from bnnify.bnn.kl_report import kl_total, parameter_kl
from bnnify.bnn.posteriors import is_flat, restore_posterior
from bnnify.errors import SpecError, UsageError
from bnnify.formats.arch import build_arch, confirm_arch, load_strict
from bnnify.formats.atomic import AtomicOutputs
from bnnify.formats.checkpoint import (
    ParameterRecord,
    TensorRecord,
    checkpoint_metadata,
    dtype_name,
    sharded_paths,
    write_tensors,
)
from bnnify.formats.model_checks import cast_checked, check_module, check_variational, finite_weight
from bnnify.formats.model_files import LoadedModel, ModelFormat
from bnnify.formats.report import KLReport, checked_kl, write_report
from bnnify.formats.safetensors_io import TensorInfo
from bnnify.formats.spec import ConversionSpec
from bnnify.formats.tree import default_deterministic
from bnnify.usecases.seeding import seeded

__all__ = ["DEFAULT_MC_SAMPLES", "ConversionResult", "ParameterSummary", "convert", "output_paths"]

Progress = Callable[[str, int], None]


@dataclass
class ParameterSummary:
    """What happened to one reparametrized parameter."""

    name: str
    shape: list[int]
    dtype: str
    sigma_mean: float
    kl: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ConversionResult:
    """Summary of a conversion (what the CLI prints)."""

    source: dict[str, Any]
    parameters: list[ParameterSummary]
    deterministic: list[str]
    method: str
    samples: int | None
    outputs: list[Path] = field(default_factory=list)

    @property
    def elements(self) -> int:
        return sum(p.numel for p in self.parameters)

    @property
    def kl_sum(self) -> float:
        return kl_total(p.kl for p in self.parameters)

    @property
    def kl_mean(self) -> float:
        return self.kl_sum / self.elements if self.elements else 0.0


def output_paths(model_path: Path, checkpoint: Path | None, report: Path | None) -> tuple:
    """Default outputs: `<stem>.bnn.safetensors` and `<stem>.kl.safetensors` here.

    The stem is the file name without its last extension.

    With only the checkpoint given, the report goes beside it: `x.bnn.safetensors`
    gives `x.kl.safetensors`, any other name `<name>.kl.safetensors`.
    """
    stem = _stem(model_path)
    if checkpoint is None:
        checkpoint = Path(f"{stem}.bnn.safetensors")
        report = report or Path(f"{stem}.kl.safetensors")
    elif report is None:
        name = checkpoint.name
        for suffix in (".bnn.safetensors", ".safetensors.index.json", ".safetensors"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        report = checkpoint.with_name(f"{name}.kl.safetensors")
    return checkpoint, report


def _stem(model_path: Path) -> str:
    """`model` for model.pt, model.state_dict for model.state_dict.pt, the folder's name."""
    name = model_path.name
    if model_path.is_dir():
        return name
    for suffix in (".safetensors.index.json", ".index.json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def _kl_samples(spec: ConversionSpec, mc_samples: int | None, probe: Tensor) -> int | None:
    """None for the closed form, else the Monte Carlo sample count to use."""
    if mc_samples is not None:
        return mc_samples
    return default_samples(get_posterior(spec.posterior, probe), get_prior(spec.prior, probe))


def _keep(name: str, meta: Any, include: list[str] | None, exclude: list[str]) -> bool:
    """Whether tensor `name` stays deterministic (see the README's default exclude list)."""
    if not meta.dtype.is_floating_point or meta.kind == "buffer":
        return True
    explicit = include is not None and matches(name, include)
    if meta.kind == "unknown" and default_deterministic(name, meta) and not explicit:
        return True
    return (include is not None and not explicit) or matches(name, exclude)


def _ties(model: LoadedModel) -> dict[str, str]:
    """Names of a state dict that share another key's storage (tied weights) -> that key."""
    if model.format is not ModelFormat.STATE_DICT:
        return {}
    first: dict[tuple, str] = {}
    ties = {}
    for name in model.names():
        t = model.tensor(name)
        if t.numel() == 0:
            continue
        key = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
        )
        if key in first:
            ties[name] = first[key]
        else:
            first[key] = name
    return ties


def _choose(model: LoadedModel, spec: ConversionSpec) -> tuple[dict[str, list[str]], list[str]]:
    """Splits the tensors into variational ones (with their tied aliases) and the rest."""
    include, exclude = spec.include, list(spec.exclude)
    ties = _ties(model)
    variational: dict[str, list[str]] = {}
    deterministic = []
    for name in model.names():
        canonical = ties.get(name, name)
        if canonical in variational:
            variational[canonical].append(name)
        elif canonical == name and not _keep(name, model.meta(name), include, exclude):
            variational[name] = [name]
        else:
            deterministic.append(name)
    if not variational:
        shown = ", ".join(model.names()[:12])
        raise UsageError(
            f"no tensor to reparametrize with include={include!r} exclude={exclude!r}",
            hint=f"Tensor names: {shown}.",
        )
    return variational, deterministic


def _layout(
    spec: ConversionSpec, name: str, shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[dict[str, TensorInfo], dict[str, TensorInfo]]:
    """Output tensors of one parameter (posterior roles, prior buffers), without data."""
    meta = torch.empty(shape, dtype=dtype, device="meta")
    if is_flat(PosteriorFactory[spec.posterior[0]]):
        roles = {role: TensorInfo(f"{name}.{role}", dtype, shape) for role in ("mu", "rho")}
    else:
        posterior = get_posterior(spec.posterior, meta)
        roles = {
            k: TensorInfo(f"{name}.{k}", t.dtype, tuple(t.shape))
            for k, t in posterior.state_dict().items()
        }
    prior = get_prior(spec.prior, meta)
    priors = {
        k: TensorInfo(f"{name}.prior.{k}", t.dtype, tuple(t.shape))
        for k, t in prior.named_buffers()
        if t.dim() > 0
    }
    return roles, priors


class _TensorwiseSource:
    """Produces the output tensors of a streamed conversion, one parameter at a time."""

    def __init__(
        self,
        model: LoadedModel,
        spec: ConversionSpec,
        samples: int | None,
        progress: Progress | None,
    ):
        self.model = model
        self.spec = spec
        self.samples = samples
        self.progress = progress
        self.device = torch.device(spec.device)
        self.dtype = spec.torch_dtype()
        self.owner: dict[str, tuple[str, str]] = {}
        self.pending: dict[str, dict[str, Tensor]] = {}
        self.summaries: dict[str, ParameterSummary] = {}

    def load(self, name: str) -> Tensor:
        tensor = self.model.tensor(name)
        if self.dtype is not None and tensor.is_floating_point():
            tensor = cast_checked(tensor, self.dtype, name, self.model.path.name)
        return tensor

    def produce(self, key: str) -> Tensor:
        owner = self.owner.get(key)
        if owner is None:
            tensor = self.load(key)
            if self.progress:
                self.progress(key, tensor.numel())
            return tensor
        name, role = owner
        if name not in self.pending:
            self.pending[name] = self._convert(name)
        tensors = self.pending[name]
        tensor = tensors.pop(role)
        if not tensors:
            del self.pending[name]
        return tensor

    @torch.no_grad()
    def _convert(self, name: str) -> dict[str, Tensor]:
        weight = finite_weight(self.load(name), name, self.model.path.name).to(self.device)
        with seeded(self.spec.seed, name, self.device):
            posterior = get_posterior(self.spec.posterior, weight)
            prior = get_prior(self.spec.prior, weight)
        with seeded(self.spec.seed, f"kl:{name}", self.device):
            kl = float(parameter_kl(posterior, prior, self.samples))
        method = "analytic" if self.samples is None else "monte_carlo"
        kl = checked_kl(
            kl, name=name, elements=weight.numel(), method=method, source=self.model.path.name
        )
        out = {k: t.detach().cpu() for k, t in posterior.state_dict().items()}
        for k, t in prior.named_buffers():
            if t.dim() > 0:
                out[f"prior.{k}"] = t.detach().cpu()
        sigma = _sigma_mean(posterior)
        self.summaries[name] = ParameterSummary(
            name, list(weight.shape), dtype_name(weight.dtype), sigma, kl
        )
        if self.progress:
            self.progress(name, weight.numel())
        return out


def _sigma_mean(posterior: Any) -> float:
    if hasattr(posterior, "rho"):
        # By chunks: float64 copies of a whole rho and of its softplus would take 4x its size.
        rho = posterior.rho.detach().reshape(-1)
        total = sum(float(F.softplus(c.double()).sum()) for c in rho.split(1 << 20))
        return total / rho.numel() if rho.numel() else math.nan
    return float(posterior.distribution.stddev.detach().double().mean())


def convert(
    model: LoadedModel,
    spec: ConversionSpec,
    *,
    checkpoint: Path,
    report: Path,
    force: bool = False,
    mc_samples: int | None = None,
    shard_bytes: int | None = None,
    progress: Progress | None = None,
    arch: str | None = None,
    arch_kwargs: str | Mapping[str, Any] | None = None,
    inputs: Sequence[str | Path] = (),
) -> ConversionResult:
    """Converts `model` into a variational checkpoint and a KL report, atomically.

    Args:
        model: The loaded input model.
        spec: The resolved conversion spec.
        checkpoint: Output path (the index path stem decides shard names when sharded).
        report: Output path of the KL report.
        force: Overwrite existing outputs.
        mc_samples: Monte Carlo samples for the KL (default: closed form when known,
            else `DEFAULT_MC_SAMPLES`).
        shard_bytes: Write a sharded checkpoint with shards of at most this size.
        progress: Called with (tensor name, elements) as each tensor is done.
        arch: Confirms the spec's `arch` (building it runs its code); see `confirm_arch`.
        arch_kwargs: Confirms the spec's `arch_kwargs` (a JSON object or a mapping).
        inputs: Other files the caller read (the spec file): like the model, never
            written onto.

    Raises:
        SpecError: If the spec names an `arch` for a program file (TorchScript, export).
        UnsafeInputError: If `arch` and `arch_kwargs` do not confirm the spec's.
        OutputExistsError: If an output exists and `force` is false.
    """
    stem = checkpoint.name.removesuffix(".safetensors").removesuffix(".safetensors.index.json")
    # Fail before any work on outputs that exist (without force) or cannot be written.
    early = (
        checkpoint if shard_bytes is None else checkpoint.parent / f"{stem}.safetensors.index.json"
    )
    read = [model.path, *inputs]
    AtomicOutputs([early, report], force=force, inputs=read)
    source = {
        "name": model.path.name,
        "format": model.format.value,
        "sha256": model.sha256,
    }
    if spec.arch is not None or model.format is ModelFormat.PICKLED_MODULE:
        plan = _module_plan(model, spec, mc_samples, (arch, arch_kwargs))
    else:
        plan = _tensorwise_plan(model, spec, mc_samples, progress)
    records, kept, infos, produce, finish, samples = plan
    metadata = checkpoint_metadata(source=source, spec=spec, parameters=records, deterministic=kept)
    targets = (
        [checkpoint] if shard_bytes is None else sharded_paths(checkpoint, stem, infos, shard_bytes)
    )
    with AtomicOutputs([*targets, report], force=force, inputs=read) as outputs:
        write_tensors(
            checkpoint, infos, produce, metadata, outputs.temp, shard_bytes=shard_bytes, stem=stem
        )
        parameters = finish()
        kl_report = KLReport(
            names=[p.name for p in parameters],
            per_parameter=torch.tensor([p.kl for p in parameters], dtype=torch.float64),
            numels=torch.tensor([p.numel for p in parameters], dtype=torch.int64),
            method="analytic" if samples is None else "monte_carlo",
            samples=samples,
            posterior=_spec_part(spec.posterior),
            prior=_spec_part(spec.prior),
            checkpoint={"name": targets[-1].name, "source_sha256": model.sha256},
        )
        write_report(kl_report, outputs.temp(report))
    return ConversionResult(
        source=source,
        parameters=parameters,
        deterministic=[r.name for r in kept],
        method=kl_report.method,
        samples=samples,
        outputs=[*targets, report],
    )


def _spec_part(part: tuple[str, dict]) -> dict[str, Any]:
    return {"name": part[0], "kwargs": dict(part[1])}


def _tensorwise_plan(
    model: LoadedModel, spec: ConversionSpec, mc_samples: int | None, progress: Progress | None
) -> tuple:
    variational, deterministic = _choose(model, spec)
    target_dtype = spec.torch_dtype()
    for name in variational:
        meta = model.meta(name)
        check_variational(name, meta.dtype, meta.shape, model.path.name, target_dtype)
    first = model.meta(next(iter(variational)))
    probe_dtype = target_dtype or first.dtype
    samples = _kl_samples(spec, mc_samples, torch.zeros(3, dtype=probe_dtype))
    source = _TensorwiseSource(model, spec, samples, progress)
    records, infos = [], []
    for name in variational:
        meta = model.meta(name)
        dtype = target_dtype or meta.dtype
        roles, priors = _layout(spec, name, tuple(meta.shape), dtype)
        for role, info in roles.items():
            source.owner[info.name] = (name, role)
        for buffer, info in priors.items():
            source.owner[info.name] = (name, f"prior.{buffer}")
        infos += [*roles.values(), *priors.values()]
        records.append(
            ParameterRecord(
                name=name,
                shape=list(meta.shape),
                dtype=dtype_name(dtype),
                tensors={r: i.name for r, i in roles.items()},
                prior_tensors={b: i.name for b, i in priors.items()},
                aliases=list(variational[name]),
            )
        )
    kept = []
    for name in deterministic:
        meta = model.meta(name)
        dtype = target_dtype if target_dtype and meta.dtype.is_floating_point else meta.dtype
        kept.append(TensorRecord(name, meta.kind, list(meta.shape), dtype_name(dtype)))
        infos.append(TensorInfo(name, dtype, tuple(meta.shape)))
    _check_unique(infos)

    def finish() -> list[ParameterSummary]:
        return [source.summaries[name] for name in variational]

    return records, kept, infos, source.produce, finish, samples


def _module_plan(
    model: LoadedModel, spec: ConversionSpec, mc_samples: int | None, confirmation: tuple
) -> tuple:
    if model.format in (ModelFormat.TORCHSCRIPT, ModelFormat.EXPORT):
        raise SpecError(
            f"arch applies to state dicts, but {model.path.name!r} is a "
            f"{model.format.value} program that defines its own architecture",
            hint="Remove arch and arch_kwargs from the spec.",
        )
    if model.format is ModelFormat.PICKLED_MODULE:
        module = model.module
    else:
        confirm_arch(spec.arch, spec.arch_kwargs, *confirmation, where="the conversion spec")
        module = build_arch(spec.arch, spec.arch_kwargs)
        load_strict(module, {n: model.tensor(n) for n in model.names()}, spec.arch)
    module.to(device=spec.device, dtype=spec.torch_dtype())
    check_module(module, spec.include, spec.exclude, model.path.name)
    probe = next(module.parameters())
    samples = _kl_samples(spec, mc_samples, torch.zeros(3, dtype=probe.dtype))
    with seeded(spec.seed, "", spec.device):
        bnn = BayesianModule(
            module, spec.posterior, spec.prior, include=spec.include, exclude=list(spec.exclude)
        )
    state = {k: v.detach().cpu() for k, v in bnn.variational_state().items()}
    kls = _slot_kls(bnn, state, spec, samples, model.path.name)
    kept_params = {n for n, _ in bnn.module.named_parameters()}
    deterministic = {k: v.detach().cpu() for k, v in bnn.module.state_dict().items()}
    records, summaries, infos = [], [], []
    for slot in bnn._slots:
        prefix = f"{slot.name}."
        roles = {k[len(prefix) :]: k for k in state if k.startswith(prefix) and ".prior." not in k}
        priors = {k[len(prefix) + 6 :]: k for k in state if k.startswith(prefix + "prior.")}
        first = state[next(iter(roles.values()))]
        records.append(
            ParameterRecord(
                slot.name,
                list(slot.shape),
                dtype_name(first.dtype),
                roles,
                priors,
                list(slot.aliases),
            )
        )
        sigma = float(bnn.posterior_distribution(slot.name).stddev.detach().double().mean())
        summaries.append(
            ParameterSummary(
                slot.name, list(slot.shape), dtype_name(first.dtype), sigma, float(kls[slot.name])
            )
        )
    kept = [
        TensorRecord(
            n, "parameter" if n in kept_params else "buffer", list(t.shape), dtype_name(t.dtype)
        )
        for n, t in deterministic.items()
    ]
    tensors = {**state, **deterministic}
    infos = [TensorInfo(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    _check_unique(infos)
    return records, kept, infos, tensors.__getitem__, lambda: summaries, samples


@torch.no_grad()
def _slot_kls(
    bnn: BayesianModule, state: dict, spec: ConversionSpec, samples: int | None, source: str
) -> dict:
    """KL of each parameter, seeded per parameter like the tensor-wise path (and `kl`)."""
    kls = {}
    for slot, prior in zip(bnn._slots, bnn.priors, strict=True):
        prefix = f"{slot.name}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        own = {k: v for k, v in own.items() if not k.startswith("prior.")}
        posterior = restore_posterior(spec.posterior, own, next(iter(own.values())))
        with seeded(spec.seed, f"kl:{slot.name}", spec.device):
            value = float(parameter_kl(posterior.to(spec.device), prior, samples))
        kls[slot.name] = checked_kl(
            value,
            name=slot.name,
            elements=math.prod(slot.shape),
            method="analytic" if samples is None else "monte_carlo",
            source=source,
        )
    return kls


def _check_unique(infos: list[TensorInfo]) -> None:
    seen: set[str] = set()
    for info in infos:
        if info.name in seen:
            raise UsageError(
                f"two output tensors would be named {info.name!r}",
                hint="A parameter's name collides with another's posterior tensor; "
                "exclude one of them.",
            )
        seen.add(info.name)
