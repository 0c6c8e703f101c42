"""`bnnify predict`: predictions with their uncertainty from a (fitted) checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bnnify.cli import options as opt
from bnnify.cli.output import Output, command
from bnnify.cli.reporting import reporting
from bnnify.cli.tables import number_table
from bnnify.enums import Task

__all__ = ["predict"]

Opt = typer.Option
CheckpointArg = Annotated[Path, typer.Argument(help="Variational checkpoint (fitted or not).")]
InputOpt = Annotated[Path, Opt("--input", "-i", help="Inputs: safetensors (x), .npy, .npz or CSV.")]
TargetsOpt = Annotated[Path | None, Opt("--targets", "--labels", help="Targets: metrics.")]
TaskOpt = Annotated[Task | None, Opt(help="Default: the fitted task, else regression.")]
SeedOpt = Annotated[int, Opt(min=0, max=2**31 - 1, help="Seed of the weight samples.")]


@command
def predict(
    checkpoint: CheckpointArg,
    model: opt.ModelOpt,
    input: InputOpt,
    samples: Annotated[int, Opt(min=1, help="Weight samples.")] = 32,
    out: opt.PredictOutOpt = None,
    keep_samples: Annotated[
        bool, Opt("--keep-samples", help="Also store every sampled output in --out.")
    ] = False,
    mean_weights: Annotated[
        bool, Opt("--mean-weights", help="Deterministic prediction with the posterior means.")
    ] = False,
    keep_inputs: opt.KeepInputsOpt = False,
    targets: TargetsOpt = None,
    ood: opt.OodOpt = None,
    no_calibration: opt.NoCalibrationOpt = False,
    task: TaskOpt = None,
    batch_size: Annotated[int, Opt(min=1, help="Inputs per batch (bounds memory).")] = 256,
    input_key: opt.InputKeyOpt = None,
    y_key: opt.YKeyOpt = "y",
    model_arg: opt.ModelArgOpt = None,
    class_dim: opt.ClassDimOpt = None,
    seed: SeedOpt = 0,
    device: opt.DeviceOpt = None,
    arch: opt.ArchOpt = None,
    arch_kwargs: opt.ArchKwargsOpt = None,
    trust_pickle: opt.TrustPickleOpt = False,
    force: opt.ForceOpt = False,
    json: opt.JsonOpt = False,
    quiet: opt.QuietOpt = False,
) -> None:
    """Predict with S weight samples, with the uncertainty of each prediction."""
    sink = Output(command="predict", json_mode=json, quiet=quiet)
    if out == "-":
        sink.stdout_is_data(json_flag="--json" if json else None)
    import bnnify

    options = dict(samples=samples, targets=targets, task=task, output=out, seed=seed)
    options |= dict(keep_samples=keep_samples, mean_weights=mean_weights, batch_size=batch_size)
    options |= dict(x_key=input_key or "x", y_key=y_key, device=device, arch=arch, force=force)
    options |= dict(arch_kwargs=arch_kwargs, model_args=model_arg, class_dim=class_dim)
    options |= dict(keep_inputs=keep_inputs, ood=ood, calibration=not no_calibration)
    with reporting(sink, "Predicting"):
        result = bnnify.predict(checkpoint, model, input, trust_pickle=trust_pickle, **options)
    _render(sink, result)


def _render(out: Output, result: Any) -> None:
    out.json(result.to_json())
    summary = result.summary
    out.line(
        f"Predicted {summary['examples']} examples ({summary['task']}, "
        f"{summary['samples']} weight sample(s))"
    )
    out.line("  estimator: {estimator} ({reason})".format(**summary["estimator"]))
    out.line(f"  calibration: {_calibration(summary['calibration'])}")
    for key, value in summary.items():
        if isinstance(value, float) or key in ("positions", "class_counts", "ood_examples"):
            out.line(f"  {key}: {f'{value:.5g}' if isinstance(value, float) else value}")
    if result.metrics:
        keys = next(iter(result.metrics.values()))
        rows = {k: {m: v.get(k) for m, v in result.metrics.items()} for k in keys}
        out.table(number_table("Metrics", "metric", rows))
    for model, scores in result.ood.items():
        title = f"Out-of-distribution detection, {model.replace('_', ' ')}"
        out.table(number_table(title, "score", scores))
    if result.output is not None:
        out.line(f"  wrote {result.output}")


def _calibration(applied: dict[str, Any]) -> str:
    if not applied["applied"]:
        return f"none ({applied['reason']})"
    return f"{applied['parameter']} {applied['value']:.4g} (fitted on {applied['data']})"
