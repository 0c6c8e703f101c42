"""`prune`: the weights of lowest signal-to-noise ratio |mu| / sigma set to zero (Blundell et al.).

A pruned weight gets mu = 0 and the smallest spread its dtype holds (`bnnify.bnn.prune`),
so the result is still a checkpoint of the same model, which `kl`, `inspect`, `predict`,
`fit` and `export` read as any other. The record of each pruning is appended to its
metadata, `bnnify.prune` (`docs/format.md`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import bnnify
from bnnify.bnn.keys import posterior_key
from bnnify.bnn.prune import prune_gaussian, pruned_sigma, pruning_masks, signal_to_noise
from bnnify.enums import PruneScope, Task
from bnnify.errors import UsageError
from bnnify.formats.atomic import AtomicOutputs
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.checkpoint_checks import parse_dtype
from bnnify.formats.checkpoint_header import metadata_json
from bnnify.formats.checkpoint_writer import write_tensors
from bnnify.formats.safetensors_io import TensorInfo
from bnnify.usecases.export import ExportResult, write_export
from bnnify.usecases.export_plan import (
    ExportPlan,
    WeightsChoice,
    default_path,
    make_plan,
    model_format,
    require_inputs,
)
from bnnify.usecases.exporters import OpenedModel, open_for_export
from bnnify.usecases.predict import noise_of, predict_dataset
from bnnify.usecases.runner import check_input
from bnnify.usecases.sources import (
    CheckpointLike,
    DataLike,
    ModelLike,
    as_checkpoint,
    as_dataset,
    file_paths,
    opened_model,
)

__all__ = ["PruneResult", "prune"]

SCHEMA = "bnnify.prune/1"
PRUNE_KEY = "bnnify.prune"


@dataclass
class PruneResult:
    """What `prune` removed and wrote (what `bnnify prune --json` prints).

    Attributes:
        output: The pruned checkpoint, or the plain model (`export`).
        kind: "checkpoint" or "model".
        method: "keep" or "snr_threshold".
        keep: The fraction of weights kept (method "keep").
        snr_threshold: The signal-to-noise threshold (method "snr_threshold").
        scope: "global" (one ranking of every weight) or "layer" (one per layer).
        elements: Bayesian weights in all.
        removed: Weights pruned (those pruned before included).
        snr_cut: The highest |mu| / sigma pruned (None if none was).
        pruned_sigma: The spread of a pruned weight, by dtype.
        parameters: Per parameter: `{"name", "elements", "removed"}`.
        metrics: With data: the predict metrics `{"before": ..., "after": ...}`
            (`{"bayesian": {...}, "mean_weights": {...}}` each; a metric that is not
            finite is None).
        export: With `export`: what was written.
    """

    output: Path
    kind: str
    method: str
    keep: float | None
    snr_threshold: float | None
    scope: PruneScope
    elements: int
    removed: int
    snr_cut: float | None
    pruned_sigma: dict[str, float]
    parameters: list[dict[str, Any]]
    metrics: dict[str, Any] | None = None
    export: ExportResult | None = None

    @property
    def fraction_removed(self) -> float:
        return self.removed / self.elements if self.elements else 0.0

    def record(self) -> dict[str, Any]:
        """The pruning as recorded in the checkpoint's metadata (`bnnify.prune`)."""
        return {
            "method": self.method,
            "keep": self.keep,
            "snr_threshold": self.snr_threshold,
            "scope": self.scope.value,
            "elements": self.elements,
            "removed": self.removed,
            "snr_cut": self.snr_cut,
            "pruned_sigma": self.pruned_sigma,
            "parameters": {p["name"]: p["removed"] for p in self.parameters},
        }

    def to_json(self) -> dict[str, Any]:
        """The result as `bnnify prune --json` prints it (schema `bnnify.prune/1`)."""
        return {
            "schema": SCHEMA,
            "output": str(self.output),
            "kind": self.kind,
            **{k: v for k, v in self.record().items() if k != "parameters"},
            "fraction_removed": self.fraction_removed,
            "parameters": self.parameters,
            "metrics": self.metrics,
            "export": None if self.export is None else self.export.to_json(),
        }


def prune(
    checkpoint: CheckpointLike,
    model: ModelLike | None = None,
    *,
    keep: float | None = None,
    snr_threshold: float | None = None,
    scope: PruneScope | str = "global",
    output: str | Path | None = None,
    data: DataLike | None = None,
    targets: str | Path | Tensor | None = None,
    task: Task | str | None = None,
    samples: int = 32,
    batch_size: int = 256,
    x_key: str = "x",
    y_key: str = "y",
    seed: int = 0,
    export: bool = False,
    format: str | None = None,
    weights: str | WeightsChoice = "mean",
    arch: str | None = None,
    arch_kwargs: str | Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    force: bool = False,
) -> PruneResult:
    """Sets to zero the Bayesian weights of lowest |mu| / sigma; writes a checkpoint or a model.

    With `keep`, that fraction of the weights stays (the highest ratios), ranked over
    every Bayesian parameter together (`scope="global"`) or layer by layer
    (`"layer"`: the parameters of one module); with `snr_threshold`, every weight
    whose ratio is below it goes. Only Gaussian posteriors (`mu`, `rho`) are pruned.

    Args:
        checkpoint: The checkpoint (a file or a `Checkpoint`).
        model: The model it was converted from: needed with `data` or `export`.
        keep: Fraction of the weights to keep, in [0, 1].
        snr_threshold: Prune every weight with |mu| / sigma below this.
        scope: "global" or "layer" (with `keep`).
        output: The pruned checkpoint [default: `<stem>.pruned.safetensors` beside the
            checkpoint], or with `export` the model (default: see `export`).
        data: Data with targets (a file, `Dataset` or `(x, y)`): metrics before and
            after, computed as `predict` does, with the same seed; also the example
            inputs of an export.
        targets: Targets given apart from `data`.
        task: "regression" or "classification" (default: the fitted task).
        samples: Weight samples for the metrics.
        batch_size: Inputs per batch for the metrics.
        x_key: Input tensor name in a data file.
        y_key: Target tensor name in a data file.
        seed: Seed of the metrics' samples (and of an exported sample).
        export: Write a plain model of the pruned posterior instead (see `export`).
        format: Its format (see `export`).
        weights: Its weights: "mean", "sample" or "ensemble:K".
        arch: For a state dict: confirms the architecture the checkpoint names.
        arch_kwargs: Confirms its recorded keyword arguments too.
        trust_pickle: Load a pickled `nn.Module` file (this runs its code).
        force: Overwrite `output` if it exists.

    Raises:
        UsageError: For invalid options, a posterior that is not Gaussian, or `data` or
            `export` without a model.
        InputError: If the model is not the checkpoint's, or the data do not fit.
        OutputExistsError: If `output` exists and `force` is false.
    """
    scope = PruneScope.parse(scope)
    _check_options(keep, snr_threshold, scope, model, data, export)
    ckpt = as_checkpoint(checkpoint)
    _check_gaussian(ckpt)
    plan = None
    if export:
        assert model is not None
        source = model_format(model)
        plan = make_plan(ckpt, source, format, WeightsChoice.parse(weights), seed, task, False)
        require_inputs(source, plan, data is not None)
    destination = _destination(ckpt.path, output, plan)
    paths = file_paths(checkpoint, model, data, targets)
    outputs = AtomicOutputs([destination], force=force, inputs=paths)
    snr = _signal_to_noise(ckpt)
    groups = {name: name.rpartition(".")[0] for name in snr}
    masks = pruning_masks(
        snr,
        keep=keep,
        threshold=snr_threshold,
        groups=groups if scope is PruneScope.LAYER else None,
    )
    result = _result(ckpt, snr, masks, keep, snr_threshold, scope, destination, plan is not None)
    pruned = {name: _pruned(ckpt, name, mask) for name, mask in masks.items()}
    if data is None and plan is None:
        _write_checkpoint(ckpt, pruned, result, outputs, destination)
        return result
    dataset = None
    if data is not None:
        dataset = as_dataset(data, targets=targets, x_key=x_key, y_key=y_key)
    chosen = Task.parse(task if task is not None else (ckpt.fit or {}).get("task", "regression"))
    settings = {"task": chosen, "samples": samples, "batch_size": batch_size, "seed": seed}
    with opened_model(model, trust_pickle=trust_pickle) as loaded:
        opened = open_for_export(loaded, ckpt, arch=arch, arch_kwargs=arch_kwargs)
        result.metrics = _prune_runner(opened, ckpt, pruned, dataset, settings)
        if plan is not None:
            x = None if dataset is None else dataset.x.sole("export checks")
            record = {"pruned": result.record()}
            result.export = write_export(opened, ckpt, plan, destination, outputs, x, record)
            return result
    _write_checkpoint(ckpt, pruned, result, outputs, destination)
    return result


def _prune_runner(
    opened: OpenedModel,
    ckpt: Checkpoint,
    pruned: Mapping[str, Mapping[str, Tensor]],
    dataset: Any,
    settings: dict[str, Any],
) -> dict[str, Any] | None:
    """Prunes the runner's posterior in place; with data, the metrics before and after."""
    before = _metrics(opened, ckpt, dataset, settings)
    state = {posterior_key(n, role): t for n, roles in pruned.items() for role, t in roles.items()}
    opened.runner.bnn.load_variational_state(state, strict=False)
    if dataset is None:
        return None
    return {"before": before, "after": _metrics(opened, ckpt, dataset, settings)}


def _check_options(
    keep: float | None,
    snr_threshold: float | None,
    scope: PruneScope,
    model: ModelLike | None,
    data: DataLike | None,
    export: bool,
) -> None:
    if (keep is None) == (snr_threshold is None):
        raise UsageError(
            "choose what to prune with exactly one of --keep FRACTION and --snr-threshold T",
            hint="E.g. --keep 0.05 keeps the 5% of weights with the highest |mu| / sigma.",
        )
    if snr_threshold is not None and scope is PruneScope.LAYER:
        raise UsageError(
            "--scope layer ranks weights for --keep; a threshold applies to each weight alone",
            hint="Drop --scope, or use --keep.",
        )
    pruning_masks({}, keep=keep, threshold=snr_threshold)  # the values' own checks
    if model is None and (data is not None or export):
        what = "--data" if data is not None else "--export"
        raise UsageError(f"{what} needs the model: pass --model (the file it was converted from)")


def _check_gaussian(ckpt: Checkpoint) -> None:
    for name, record in ckpt.parameters.items():
        if set(record.tensors) != {"mu", "rho"}:
            raise UsageError(
                f"{ckpt.path.name}: parameter {name!r} has a {ckpt.spec.posterior[0]!r} "
                f"posterior (tensors {sorted(record.tensors)}): prune needs Gaussian "
                "posteriors (mu, rho)",
                hint="Convert with the gaussian or pretrained_gaussian posterior.",
            )


def _destination(checkpoint: Path, output: str | Path | None, plan: ExportPlan | None) -> Path:
    if output is not None:
        return Path(output)
    name = checkpoint.name
    for suffix in (".safetensors.index.json", ".safetensors"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    pruned = checkpoint.with_name(f"{name}.pruned.safetensors")
    return pruned if plan is None else default_path(pruned, plan)


@torch.no_grad()
def _signal_to_noise(ckpt: Checkpoint) -> dict[str, Tensor]:
    return {name: signal_to_noise(ckpt.posterior(name).distribution) for name in ckpt.parameters}


def _pruned(ckpt: Checkpoint, name: str, mask: Tensor) -> dict[str, Tensor]:
    state = ckpt.posterior_state(name)
    mu, rho = prune_gaussian(state["mu"], state["rho"], mask)
    return {"mu": mu, "rho": rho}


@torch.no_grad()
def _result(
    ckpt: Checkpoint,
    snr: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    keep: float | None,
    threshold: float | None,
    scope: PruneScope,
    destination: Path,
    exported: bool,
) -> PruneResult:
    parameters, cut = [], None
    for name, mask in masks.items():
        parameters.append({"name": name, "elements": mask.numel(), "removed": int(mask.sum())})
        if bool(mask.any()):
            top = float(snr[name][mask.reshape(-1)].max())
            cut = top if cut is None else max(cut, top)
    dtypes = {record.dtype for record in ckpt.parameters.values()}
    return PruneResult(
        output=destination,
        kind="model" if exported else "checkpoint",
        method="keep" if keep is not None else "snr_threshold",
        keep=keep,
        snr_threshold=threshold,
        scope=scope,
        elements=sum(p["elements"] for p in parameters),
        removed=sum(p["removed"] for p in parameters),
        snr_cut=cut,
        pruned_sigma={d: pruned_sigma(parse_dtype(d, str(ckpt.path))) for d in sorted(dtypes)},
        parameters=parameters,
    )


def _metrics(
    opened: OpenedModel, ckpt: Checkpoint, dataset: Any, settings: dict[str, Any]
) -> dict[str, Any] | None:
    """`predict`'s metrics of the runner's current posterior on `dataset` (None without)."""
    if dataset is None:
        return None
    runner, task = opened.runner, settings["task"]
    check_input(runner, dataset.x)
    noise = noise_of(ckpt.fit_tensors()) if task is Task.REGRESSION else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        result = predict_dataset(
            runner,
            dataset,
            task=task,
            samples=settings["samples"],
            batch_size=settings["batch_size"],
            noise=noise,
        )
    return {
        model: {k: v if math.isfinite(v) else None for k, v in metrics.items()}
        for model, metrics in result.metrics.items()
    }


def _write_checkpoint(
    ckpt: Checkpoint,
    pruned: Mapping[str, Mapping[str, Tensor]],
    result: PruneResult,
    outputs: AtomicOutputs,
    destination: Path,
) -> None:
    """The checkpoint with the pruned posteriors, its metadata and a `bnnify.prune` record."""
    replaced = {}
    for name, roles in pruned.items():
        for role, tensor in roles.items():
            replaced[ckpt.parameters[name].tensors[role]] = tensor
    tensors = {}
    for key in ckpt.files:
        tensors[key] = (replaced[key] if key in replaced else ckpt.tensor(key)).contiguous()
    history = []
    if PRUNE_KEY in ckpt.metadata:
        history = metadata_json(ckpt.metadata, PRUNE_KEY, str(ckpt.path), list)
    metadata = {k: v for k, v in ckpt.metadata.items() if k != "total_size"}
    metadata["bnnify.version"] = bnnify.__version__
    metadata["torch.version"] = torch.__version__
    metadata[PRUNE_KEY] = json.dumps([*history, result.record()], sort_keys=True)
    infos = [TensorInfo.of(key, tensor) for key, tensor in tensors.items()]
    with outputs:
        temp = outputs.temp(destination)
        write_tensors(destination, infos, tensors.__getitem__, metadata, lambda final: temp)
