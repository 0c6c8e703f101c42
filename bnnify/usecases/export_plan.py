"""What `export` writes: the weights chosen, the format, and the refusals and needs of each.

What each source model can become (`format`; the default first):

- TorchScript: torchscript, state_dict, safetensors; an ensemble as torchscript (a loop).
- torch.export: export (its own graph, tensors replaced), state_dict, safetensors; an
  ensemble as export (traced, vmap or a loop).
- a state dict, safetensors or sharded file (with `arch`), a pickled module, an
  `nn.Module`: its own kind (safetensors for both safetensors kinds, else state_dict),
  torchscript (if TorchScript compiles the module), export (traced); an ensemble as
  export (vmap or a loop) or torchscript (a loop).

Refused: an ensemble as a state dict (it is a computation: the mean and spread of K
predictions), a TorchScript model as torch.export (torch.export cannot trace
TorchScript code) and a torch.export program as TorchScript (TorchScript cannot compile
its generated code).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bnnify.enums import ExportFormat, Task
from bnnify.errors import InvalidArgumentError, UsageError
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.detect import detect_format
from bnnify.formats.model_files import LoadedModel, ModelFormat
from bnnify.formats.plain_model import EXTENSIONS
from bnnify.usecases.exporters import Draws
from bnnify.usecases.predict import noise_of
from bnnify.usecases.sources import ModelLike, path_of

__all__ = [
    "ExportPlan",
    "WeightsChoice",
    "default_path",
    "make_plan",
    "model_format",
    "require_inputs",
]


@dataclass(frozen=True)
class WeightsChoice:
    """`mean`, `sample` or `ensemble:K` (K >= 2): which weights the plain model gets."""

    kind: str
    count: int = 1

    @classmethod
    def parse(cls, value: str | WeightsChoice) -> WeightsChoice:
        """Raises `InvalidArgumentError` for anything else, saying what is valid."""
        if isinstance(value, WeightsChoice):
            return value
        text = str(value).strip().lower()
        if text in ("mean", "sample"):
            return cls(text)
        kind, _, count = text.partition(":")
        if kind == "ensemble" and count.isdigit() and int(count) >= 2:
            return cls("ensemble", int(count))
        raise InvalidArgumentError(
            f"invalid weights {value!r}",
            hint="Choose mean (the posterior means), sample (one sample, --seed) or "
            "ensemble:K (K >= 2 samples, their mean and standard deviation).",
        )

    def __str__(self) -> str:
        return f"ensemble:{self.count}" if self.kind == "ensemble" else self.kind


@dataclass(frozen=True)
class ExportPlan:
    """What to write: the format, the weights, and for an ensemble how it reduces."""

    format: ExportFormat
    weights: WeightsChoice
    seed: int = 0
    softmax: bool = False
    noise: float = 0.0

    @property
    def draws(self) -> Draws:
        return Draws(self.weights.kind == "mean", self.weights.count, self.seed)


def make_plan(
    ckpt: Checkpoint,
    source: ModelFormat,
    format: ExportFormat | str | None,
    choice: WeightsChoice,
    seed: int,
    task: Task | str | None,
    aleatoric: bool,
) -> ExportPlan:
    """The plan for `source`, refusing what the format cannot hold (`UsageError`)."""
    ensemble = choice.kind == "ensemble"
    fmt = ExportFormat.parse(format) if format is not None else _default_format(source, ensemble)
    if ensemble and fmt in (ExportFormat.STATE_DICT, ExportFormat.SAFETENSORS):
        raise UsageError(
            f"an ensemble cannot be written as {fmt.value}: it is a computation (the mean "
            "and standard deviation of K predictions), which a state dict cannot hold",
            hint="Use --format torchscript or --format export, or export the samples one by "
            "one with --weights sample --seed N.",
        )
    if source is ModelFormat.TORCHSCRIPT and fmt is ExportFormat.EXPORT:
        raise UsageError(
            "a TorchScript model cannot become a torch.export program: torch.export cannot "
            "trace TorchScript code",
            hint="Use --format torchscript, state_dict or safetensors, or convert the "
            "model's torch.export program (.pt2) or state dict instead.",
        )
    if source is ModelFormat.EXPORT and fmt is ExportFormat.TORCHSCRIPT:
        raise UsageError(
            "a torch.export program cannot become TorchScript: TorchScript cannot compile "
            "its generated code",
            hint="Use --format export, state_dict or safetensors.",
        )
    chosen = Task.parse(task if task is not None else (ckpt.fit or {}).get("task", "regression"))
    noise = 0.0
    if aleatoric:
        fitted = noise_of(ckpt.fit_tensors())
        if not ensemble or chosen is not Task.REGRESSION or fitted is None:
            raise UsageError(
                "aleatoric applies to an ensemble of a regression checkpoint fitted with "
                "a noise scale (bnnify fit --task regression)",
                hint="Drop --aleatoric, or export --weights ensemble:K of a fitted checkpoint.",
            )
        noise = fitted
    softmax = ensemble and chosen is Task.CLASSIFICATION
    return ExportPlan(fmt, choice, seed, softmax, noise)


def require_inputs(source: ModelFormat, plan: ExportPlan, given: bool) -> None:
    """Refuses (`UsageError`) a plan that needs example inputs when none are given."""
    ensemble = plan.weights.kind == "ensemble"
    if given:
        return
    if plan.format is ExportFormat.EXPORT and (ensemble or source is not ModelFormat.EXPORT):
        why = "torch.export traces the model on example inputs"
    elif plan.format is ExportFormat.TORCHSCRIPT and source is ModelFormat.TORCHSCRIPT:
        why = (
            "bnnify checks on example inputs that the weights it installs in TorchScript "
            "code reach the output"
        )
    else:
        return
    raise UsageError(
        f"exporting this model as {plan.format.value} needs example inputs: {why}",
        hint="Pass --input FILE (a few rows of the data the model takes).",
    )


def default_path(checkpoint: Path, plan: ExportPlan) -> Path:
    """`<stem>.<weights tag><extension>` beside the checkpoint (see `export`)."""
    name = checkpoint.name
    for suffix in (".safetensors.index.json", ".safetensors"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    choice = plan.weights
    tag = {
        "mean": "mean",
        "sample": f"sample-seed{plan.seed}",
        "ensemble": f"ensemble{choice.count}-seed{plan.seed}",
    }[choice.kind]
    return checkpoint.with_name(f"{name}.{tag}{EXTENSIONS[plan.format]}")


def model_format(model: ModelLike) -> ModelFormat:
    if isinstance(model, LoadedModel):
        return model.format
    if isinstance(model, nn.Module):
        return ModelFormat.MODULE
    return detect_format(path_of(model, "model"))


def _default_format(source: ModelFormat, ensemble: bool) -> ExportFormat:
    if source is ModelFormat.TORCHSCRIPT:
        return ExportFormat.TORCHSCRIPT
    if source is ModelFormat.EXPORT or ensemble:
        return ExportFormat.EXPORT
    if source in (ModelFormat.SAFETENSORS, ModelFormat.SHARDED):
        return ExportFormat.SAFETENSORS
    return ExportFormat.STATE_DICT
