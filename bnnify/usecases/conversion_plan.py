"""What a conversion writes, tensor by tensor, and how each output tensor is made.

Without an architecture the plan is tensor-wise and streamed: each tensor is read
(memory-mapped for safetensors), its posterior and prior built, its KL computed and
its tensors produced just before they are written. With `arch` (or a file or object
holding a module) the module is reparametrized by `BayesianModule` and its
variational state is written. Both paths name the output tensors with `_layout`.
"""

from __future__ import annotations

import copy
import glob
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bnnify.bnn import BayesianModule, PosteriorFactory, get_posterior, get_prior
from bnnify.bnn.keys import posterior_key, prior_key
from bnnify.bnn.kinds import module_types
from bnnify.bnn.kl_report import parameter_kl
from bnnify.bnn.kl_training import default_samples
from bnnify.bnn.posteriors import is_flat, restore_posterior
from bnnify.enums import KLMethod
from bnnify.errors import SpecError, UsageError
from bnnify.formats.arch import build_arch, confirm_arch, load_strict
from bnnify.formats.checkpoint import ParameterRecord, TensorRecord, dtype_name
from bnnify.formats.model_checks import cast_checked, check_module, check_variational, finite_weight
from bnnify.formats.model_files import LoadedModel, ModelFormat
from bnnify.formats.report import checked_kl
from bnnify.formats.safetensors_io import TensorInfo
from bnnify.formats.spec import ConversionSpec
from bnnify.usecases.seeding import seeded
from bnnify.usecases.selection import choose_tensors, left_out_by_kind
from bnnify.usecases.sources import Progress

__all__ = ["ConversionPlan", "ParameterSummary", "plan_conversion"]


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
class ConversionPlan:
    """The tensors of a checkpoint and how to make them, one at a time.

    Attributes:
        parameters: The reparametrized parameters (the checkpoint's parameter map).
        deterministic: The tensors kept as they are.
        infos: Every output tensor's name, dtype and shape.
        produce: Makes output tensor `name`; called once per tensor, in writing order.
        samples: Monte Carlo samples per element of the KL (None: closed form).
        summaries: By parameter name; complete once every tensor was produced.

    Raises:
        UsageError: If two output tensors would have the same name.
    """

    parameters: list[ParameterRecord]
    deterministic: list[TensorRecord]
    infos: list[TensorInfo]
    produce: Callable[[str], Tensor]
    samples: int | None
    summaries: dict[str, ParameterSummary] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for info in self.infos:
            if info.name in seen:
                raise UsageError(
                    f"two output tensors would be named {info.name!r}",
                    hint="A parameter's name collides with another's posterior tensor; "
                    "exclude one of them.",
                )
            seen.add(info.name)

    @property
    def method(self) -> KLMethod:
        """How the KL was computed: the closed form, or Monte Carlo with `samples`."""
        return _method(self.samples)

    def summary(self) -> list[ParameterSummary]:
        """What happened to each parameter, in the order of `parameters`."""
        return [self.summaries[record.name] for record in self.parameters]


def plan_conversion(
    model: LoadedModel,
    spec: ConversionSpec,
    mc_samples: int | None = None,
    progress: Progress | None = None,
    *,
    arch: str | None = None,
    arch_kwargs: str | Mapping[str, Any] | None = None,
) -> ConversionPlan:
    """The plan for `model`: through its module when there is one, else tensor-wise.

    Args:
        model: The input model.
        spec: The resolved spec.
        mc_samples: Monte Carlo samples for the KL (default: closed form when known).
        progress: Told the elements of each tensor produced (tensor-wise plans only).
        arch: The user's confirmation of the spec's `arch` (see `confirm_arch`).
        arch_kwargs: The user's confirmation of the spec's `arch_kwargs`.

    Raises:
        SpecError: If `arch` is given for a program file, or does not build.
        UnsafeInputError: If `arch` and `arch_kwargs` do not confirm the spec's.
        UsageError: If no tensor is left to reparametrize.
        InputError: If a tensor to reparametrize is empty, not finite or in a dtype
            without arithmetic, or a KL comes out NaN or negative.
    """
    if spec.arch is not None or model.format in (ModelFormat.PICKLED_MODULE, ModelFormat.MODULE):
        return _module_plan(model, spec, mc_samples, (arch, arch_kwargs))
    return _tensorwise_plan(model, spec, mc_samples, progress)


def _kl_samples(spec: ConversionSpec, mc_samples: int | None, dtype: torch.dtype) -> int | None:
    """None for the closed form, else the Monte Carlo sample count to use."""
    if mc_samples is not None:
        return mc_samples
    probe = torch.zeros(3, dtype=dtype)
    return default_samples(get_posterior(spec.posterior, probe), get_prior(spec.prior, probe))


def _layout(
    spec: ConversionSpec, name: str, shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[dict[str, TensorInfo], dict[str, TensorInfo]]:
    """Output tensors of one parameter (posterior roles, prior buffers), without data."""
    meta = torch.empty(shape, dtype=dtype, device="meta")
    if is_flat(PosteriorFactory[spec.posterior[0]]):
        shapes = {role: (dtype, shape) for role in ("mu", "rho")}
    else:
        posterior = get_posterior(spec.posterior, meta)
        shapes = {k: (t.dtype, tuple(t.shape)) for k, t in posterior.state_dict().items()}
    roles = {k: TensorInfo(posterior_key(name, k), *v) for k, v in shapes.items()}
    prior = get_prior(spec.prior, meta)
    priors = {
        k: TensorInfo(prior_key(name, k), t.dtype, tuple(t.shape))
        for k, t in prior.named_buffers()
        if t.dim() > 0
    }
    return roles, priors


def _record(
    spec: ConversionSpec,
    name: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    aliases: Sequence[str],
) -> tuple[ParameterRecord, list[TensorInfo]]:
    """The parameter's entry in the checkpoint's map, and its output tensors."""
    roles, priors = _layout(spec, name, tuple(shape), dtype)
    tensors = {role: info.name for role, info in roles.items()}
    prior_tensors = {buffer: info.name for buffer, info in priors.items()}
    record = ParameterRecord(
        name, list(shape), dtype_name(dtype), tensors, prior_tensors, list(aliases)
    )
    return record, [*roles.values(), *priors.values()]


# ------------------------------------------------------------------ tensor-wise


def _tensorwise_plan(
    model: LoadedModel, spec: ConversionSpec, mc_samples: int | None, progress: Progress | None
) -> ConversionPlan:
    variational, deterministic = choose_tensors(model, spec)
    target_dtype = spec.torch_dtype()
    for name in variational:
        meta = model.meta(name)
        check_variational(name, meta.dtype, meta.shape, model.path.name, target_dtype)
    first = model.meta(next(iter(variational)))
    samples = _kl_samples(spec, mc_samples, target_dtype or first.dtype)
    total = sum(model.meta(name).numel for name in model.names())

    def advance(elements: int) -> None:
        if progress is not None:
            progress(elements, total)

    source = _TensorwiseSource(model, spec, samples, advance)
    records, infos = [], []
    for name, aliases in variational.items():
        meta = model.meta(name)
        record, outputs = _record(spec, name, meta.shape, target_dtype or meta.dtype, aliases)
        records.append(record)
        infos += outputs
        source.owner.update(dict.fromkeys((info.name for info in outputs), name))
    kept = []
    for name in deterministic:
        meta = model.meta(name)
        dtype = target_dtype if target_dtype and meta.dtype.is_floating_point else meta.dtype
        kept.append(TensorRecord(name, meta.kind, list(meta.shape), dtype_name(dtype)))
        infos.append(TensorInfo(name, dtype, tuple(meta.shape)))
    return ConversionPlan(records, kept, infos, source.produce, samples, source.summaries)


class _TensorwiseSource:
    """Produces the output tensors of a streamed conversion, one parameter at a time."""

    def __init__(
        self,
        model: LoadedModel,
        spec: ConversionSpec,
        samples: int | None,
        advance: Callable[[int], Any],
    ):
        self.model = model
        self.spec = spec
        self.samples = samples
        self.advance = advance
        self.device = torch.device(spec.device)
        self.dtype = spec.torch_dtype()
        self.owner: dict[str, str] = {}
        self.pending: dict[str, dict[str, Tensor]] = {}
        self.summaries: dict[str, ParameterSummary] = {}

    def load(self, name: str) -> Tensor:
        tensor = self.model.tensor(name)
        if self.dtype is not None and tensor.is_floating_point():
            tensor = cast_checked(tensor, self.dtype, name, self.model.path.name)
        return tensor

    def produce(self, key: str) -> Tensor:
        name = self.owner.get(key)
        if name is None:
            tensor = self.load(key)
            self.advance(tensor.numel())
            return tensor
        if name not in self.pending:
            self.pending[name] = self._convert(name)
        tensors = self.pending[name]
        tensor = tensors.pop(key)
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
            kl = float(parameter_kl(posterior, prior, self.samples, self.advance))
        kl = checked_kl(
            kl,
            name=name,
            elements=weight.numel(),
            method=_method(self.samples),
            source=self.model.path.name,
        )
        out = {posterior_key(name, k): t.detach().cpu() for k, t in posterior.state_dict().items()}
        for k, t in prior.named_buffers():
            if t.dim() > 0:
                out[prior_key(name, k)] = t.detach().cpu()
        sigma = _sigma_mean(posterior)
        self.summaries[name] = ParameterSummary(
            name, list(weight.shape), dtype_name(weight.dtype), sigma, kl
        )
        return out


def _sigma_mean(posterior: Any) -> float:
    if hasattr(posterior, "rho"):
        # By chunks: float64 copies of a whole rho and of its softplus would take 4x its size.
        rho = posterior.rho.detach().reshape(-1)
        total = sum(float(F.softplus(c.double()).sum()) for c in rho.split(1 << 20))
        return total / rho.numel() if rho.numel() else math.nan
    return float(posterior.distribution.stddev.detach().double().mean())


# ------------------------------------------------------------------ module


def _module_plan(
    model: LoadedModel, spec: ConversionSpec, mc_samples: int | None, confirmation: tuple
) -> ConversionPlan:
    if model.format in (ModelFormat.TORCHSCRIPT, ModelFormat.EXPORT):
        raise SpecError(
            f"arch applies to state dicts, but {model.path.name!r} is a "
            f"{model.format.value} program that defines its own architecture",
            hint="Remove arch and arch_kwargs from the spec.",
        )
    if model.module is not None:
        # Reparametrized in place: the caller's module stays as it was.
        module = copy.deepcopy(model.module)
    else:
        confirm_arch(spec.arch, spec.arch_kwargs, *confirmation, where="the conversion spec")
        module = build_arch(spec.arch, spec.arch_kwargs)
        load_strict(module, {n: model.tensor(n) for n in model.names()}, spec.arch)
    module.to(device=spec.device, dtype=spec.torch_dtype())
    names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
    what = f"{model.path.name} ({model.format.value})"
    by_kind = left_out_by_kind(spec, names, module_types(module), what)
    exclude = [*spec.exclude, *sorted(glob.escape(name) for name in by_kind)]
    check_module(module, spec.include, exclude, model.path.name)
    samples = _kl_samples(spec, mc_samples, next(module.parameters()).dtype)
    with seeded(spec.seed, "", spec.device):
        bnn = BayesianModule(
            module, spec.posterior, spec.prior, include=spec.include, exclude=exclude
        )
    tensors = {k: v.detach().cpu() for k, v in bnn.variational_state().items()}
    records, infos, summaries = [], [], {}
    for param in bnn.reparametrized_parameters():
        dtype = param.posterior.mean.dtype
        record, outputs = _record(spec, param.name, param.shape, dtype, param.aliases)
        records.append(record)
        infos += outputs
        state = {role: tensors[key] for role, key in record.tensors.items()}
        sigma = float(param.posterior.stddev.detach().double().mean())
        kl = _parameter_kl(spec, param, state, samples, model.path.name)
        summaries[param.name] = ParameterSummary(
            param.name, list(param.shape), dtype_name(dtype), sigma, kl
        )
    assert {info.name for info in infos} == set(tensors), "the layout names every tensor"
    kept_params = {n for n, _ in bnn.module.named_parameters()}
    kept = []
    for name, tensor in bnn.module.state_dict().items():
        kind = "parameter" if name in kept_params else "buffer"
        kept.append(TensorRecord(name, kind, list(tensor.shape), dtype_name(tensor.dtype)))
        tensors[name] = tensor.detach().cpu()
        infos.append(TensorInfo(name, tensor.dtype, tuple(tensor.shape)))
    return ConversionPlan(records, kept, infos, tensors.__getitem__, samples, summaries)


@torch.no_grad()
def _parameter_kl(
    spec: ConversionSpec, param: Any, state: dict[str, Tensor], samples: int | None, source: str
) -> float:
    """KL of one parameter, seeded per parameter like the tensor-wise path (and `kl`)."""
    posterior = restore_posterior(spec.posterior, state, next(iter(state.values())))
    with seeded(spec.seed, f"kl:{param.name}", spec.device):
        value = float(parameter_kl(posterior.to(spec.device), param.prior, samples))
    elements = math.prod(param.shape)
    return checked_kl(
        value, name=param.name, elements=elements, method=_method(samples), source=source
    )


def _method(samples: int | None) -> KLMethod:
    return KLMethod.ANALYTIC if samples is None else KLMethod.MONTE_CARLO
