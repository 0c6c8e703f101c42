"""`export`: a plain PyTorch model from a checkpoint's posterior, that needs nothing from bnnify.

Which formats each model can become, and what is refused: `export_plan`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

import bnnify
from bnnify.bnn.ensemble import ensemble_moments
from bnnify.enums import ExportFormat, Task
from bnnify.errors import InvalidArgumentError
from bnnify.formats.atomic import AtomicOutputs
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.plain_model import read_plain, write_plain
from bnnify.usecases.export_plan import (
    ExportPlan,
    WeightsChoice,
    default_path,
    make_plan,
    model_format,
    require_inputs,
)
from bnnify.usecases.exporters import (
    CHECK_EXAMPLES,
    OpenedModel,
    cast_tensor,
    check_tensors,
    compare_outputs,
    export_program,
    open_for_export,
    plain_state,
    reference_outputs,
    script_module,
    stacked_program,
)
from bnnify.usecases.sources import (
    CheckpointLike,
    DataLike,
    ModelLike,
    as_checkpoint,
    as_dataset,
    file_paths,
    opened_model,
)

__all__ = ["ExportResult", "export", "write_export"]

SCHEMA = "bnnify.export/1"


@dataclass
class ExportResult:
    """What `export` wrote (what `bnnify export --json` prints).

    Attributes:
        output: The plain model file.
        format: Its format.
        weights: "mean", "sample" or "ensemble".
        samples: Weight samples in it (None for the means).
        seed: Seed of the samples (None for the means).
        checkpoint: File name of the checkpoint.
        source: `{"name", "format", "sha256"}` of the model file.
        outputs: What the model returns: `["output"]`, or `["mean", "std"]` (ensemble).
        spread: For an ensemble, "epistemic" or "epistemic+aleatoric".
        reduce: For an ensemble, "outputs" or "probabilities" (softmax first).
        batching: For an ensemble, "vmap" or "loop".
        dynamic_batch: For a traced program, whether any batch size is accepted (None:
            not traced, or as the source program was exported).
        check: The exported file read back and compared: `{"kind": "outputs" |
            "tensors", "examples", "max_abs_diff", "tolerance"}`; None without inputs.
    """

    output: Path
    format: ExportFormat
    weights: str
    samples: int | None
    seed: int | None
    checkpoint: str
    source: dict[str, str]
    outputs: list[str]
    spread: str | None = None
    reduce: str | None = None
    batching: str | None = None
    dynamic_batch: bool | None = None
    check: dict[str, Any] | None = None
    bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        """The result as `bnnify export --json` prints it (schema `bnnify.export/1`)."""
        return {
            "schema": SCHEMA,
            "output": str(self.output),
            "format": self.format.value,
            "weights": self.weights,
            "samples": self.samples,
            "seed": self.seed,
            "checkpoint": self.checkpoint,
            "source": self.source,
            "outputs": self.outputs,
            "spread": self.spread,
            "reduce": self.reduce,
            "batching": self.batching,
            "dynamic_batch": self.dynamic_batch,
            "check": self.check,
            "bytes": self.bytes,
        }


def export(
    checkpoint: CheckpointLike,
    model: ModelLike,
    *,
    format: ExportFormat | str | None = None,
    weights: str | WeightsChoice = "mean",
    seed: int = 0,
    inputs: DataLike | None = None,
    x_key: str = "x",
    task: Task | str | None = None,
    aleatoric: bool = False,
    output: str | Path | None = None,
    arch: str | None = None,
    arch_kwargs: str | Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    force: bool = False,
) -> ExportResult:
    """Writes a plain model with weights from a checkpoint's posterior, atomically.

    The posterior means (`weights="mean"`), one sample (`"sample"`, drawn from `seed`),
    or an ensemble of K samples (`"ensemble:K"`): one module that returns the mean and
    standard deviation (dividing by K) of its K predictions, or of their softmax
    probabilities for a classification checkpoint. The spread is the epistemic part;
    `aleatoric=True` adds a fitted regression noise in quadrature. The samples are the
    ones `predict(seed=seed)` draws first where it samples weights (see `exporters`).
    With `inputs`, the written file is read back, run on up to `CHECK_EXAMPLES` of them
    and compared with bnnify's own predictions; a mismatch raises and writes nothing.

    Args:
        checkpoint: The (fitted) checkpoint, a file or a `Checkpoint`.
        model: The model it was converted from (a file, `LoadedModel` or `nn.Module`).
        format: "state_dict", "safetensors", "torchscript" or "export" (default: the
            model's own; for an ensemble, torchscript or export).
        weights: "mean", "sample" or "ensemble:K".
        seed: Seed of the samples.
        inputs: Example inputs (a data file, `Dataset` or tensor): needed to trace a
            torch.export program and to check a TorchScript model's weights.
        x_key: Input tensor name in a data file.
        task: "regression" or "classification" (default: the fitted task): an
            ensemble averages a classifier's probabilities.
        aleatoric: Add the fitted noise to an ensemble's spread (regression).
        output: The file [default: beside the checkpoint,
            `<stem>.<mean|sample-seedN|ensembleK-seedN><.state_dict.pt|.safetensors|
            .torchscript.pt|.pt2>`].
        arch: For a state dict: confirms the architecture the checkpoint names.
        arch_kwargs: Confirms its recorded keyword arguments too.
        trust_pickle: Load a pickled `nn.Module` file (this runs its code).
        force: Overwrite `output` if it exists.

    Raises:
        UsageError: For a format that cannot hold what was asked, missing inputs where
            they are needed, or a model that TorchScript or torch.export cannot take.
        InputError: If the model is not the checkpoint's, or the file read back does
            not reproduce bnnify's predictions.
        UnsafeInputError: For an architecture not confirmed, or pickled code.
        OutputExistsError: If `output` exists and `force` is false.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidArgumentError(f"seed must be an integer >= 0, got {seed!r}")
    choice = WeightsChoice.parse(weights)
    ckpt = as_checkpoint(checkpoint)
    plan = make_plan(ckpt, model_format(model), format, choice, seed, task, aleatoric)
    require_inputs(model_format(model), plan, inputs is not None)
    destination = Path(output) if output is not None else default_path(ckpt.path, plan)
    outputs = AtomicOutputs(
        [destination], force=force, inputs=file_paths(checkpoint, model, inputs)
    )
    x = None
    if inputs is not None:
        x = as_dataset(inputs, with_target=False, x_key=x_key).x.sole("export checks")
    with opened_model(model, trust_pickle=trust_pickle) as loaded:
        opened = open_for_export(loaded, ckpt, arch=arch, arch_kwargs=arch_kwargs)
        return write_export(opened, ckpt, plan, destination, outputs, x)


def write_export(
    opened: OpenedModel,
    ckpt: Checkpoint,
    plan: ExportPlan,
    destination: Path,
    outputs: AtomicOutputs,
    x: Tensor | None,
    provenance: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Builds the plain model of `plan` from `opened`'s posterior and commits it.

    The shared half of `export` and `prune(export=True)`, once the outputs are checked;
    `provenance` adds keys to the record written in the file.
    """
    loaded = opened.loaded
    ensemble = plan.weights.kind == "ensemble"
    result = ExportResult(
        output=destination,
        format=plan.format,
        weights=plan.weights.kind,
        samples=None if plan.weights.kind == "mean" else plan.weights.count,
        seed=None if plan.weights.kind == "mean" else plan.seed,
        checkpoint=ckpt.path.name,
        source={"name": loaded.path.name, "format": loaded.format.value, "sha256": loaded.sha256},
        outputs=["mean", "std"] if ensemble else ["output"],
        spread=("epistemic+aleatoric" if plan.noise > 0 else "epistemic") if ensemble else None,
        reduce=("probabilities" if plan.softmax else "outputs") if ensemble else None,
    )
    sample = None if x is None else cast_tensor(opened.runner, x[:CHECK_EXAMPLES])
    reference = None if sample is None else reference_outputs(opened.runner, plan.draws, sample)
    weight_sets = opened.weights(plan.draws)
    record = {**_provenance(result, plan), **(provenance or {})}
    with outputs:
        temp = outputs.temp(destination)
        if plan.format in (ExportFormat.STATE_DICT, ExportFormat.SAFETENSORS):
            state = plain_state(opened, weight_sets[0])
            write_plain(state, plan.format, temp, record)
            result.check = check_tensors(read_plain(temp, plan.format), state)
        else:
            _write_module(opened, plan, weight_sets, sample, temp, record, result)
            if sample is not None:
                expected = _expected(reference, plan)
                result.check = compare_outputs(read_plain(temp, plan.format), sample, expected)
        result.bytes = temp.stat().st_size
    return result


def _write_module(
    opened: OpenedModel,
    plan: ExportPlan,
    weight_sets: list[dict[str, Tensor]],
    sample: Tensor | None,
    temp: Path,
    provenance: dict[str, Any],
    result: ExportResult,
) -> None:
    reduce = {"softmax": plan.softmax, "noise": plan.noise}
    if plan.format is ExportFormat.TORCHSCRIPT:
        module = script_module(opened, weight_sets, **reduce)
        write_plain(module, plan.format, temp, provenance)
        if plan.weights.kind == "ensemble":
            result.batching = "loop"
    elif plan.weights.kind == "ensemble":
        assert sample is not None
        program, result.batching, result.dynamic_batch = stacked_program(
            opened, weight_sets, sample, **reduce
        )
        write_plain(program, plan.format, temp, provenance)
    else:
        context, result.dynamic_batch = export_program(opened, weight_sets[0], sample)
        with context as program:
            write_plain(program, plan.format, temp, provenance)


def _expected(reference: Tensor, plan: ExportPlan) -> Tensor | tuple[Tensor, Tensor]:
    if plan.weights.kind == "ensemble":
        return ensemble_moments(reference, plan.softmax, plan.noise)
    return reference[0]


def _provenance(result: ExportResult, plan: ExportPlan) -> dict[str, Any]:
    return {
        "bnnify_version": bnnify.__version__,
        "checkpoint": result.checkpoint,
        "source": result.source,
        "weights": str(plan.weights),
        "seed": result.seed,
        "outputs": result.outputs,
        "spread": result.spread,
        "reduce": result.reduce,
    }
