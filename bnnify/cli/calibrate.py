"""`bnnify calibrate`: a temperature or a spread scale fitted on held-out data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from bnnify.cli import options as opt
from bnnify.cli.output import Output, command
from bnnify.cli.reporting import reporting
from bnnify.enums import Task

__all__ = ["calibrate"]

Opt = typer.Option
CheckpointArg = Annotated[Path, typer.Argument(help="Fitted variational checkpoint.")]
DataOpt = Annotated[
    Path,
    Opt("--data", "-d", help="Held-out data with targets (not the training data)."),
]
TaskOpt = Annotated[Task | None, Opt(help="Default: the fitted task.")]
OutOpt = Annotated[
    Path | None,
    Opt("--out", "-o", help="Calibrated checkpoint (default: its stem + .cal.safetensors)."),
]
SamplesOpt = Annotated[int, Opt(min=1, help="Weight samples (use predict's).")]
SeedOpt = Annotated[int, Opt(min=0, max=2**31 - 1, help="Seed of the weight samples.")]


@command
def calibrate(
    checkpoint: CheckpointArg,
    model: opt.ModelOpt,
    data: DataOpt,
    samples: SamplesOpt = 32,
    task: TaskOpt = None,
    out: OutOpt = None,
    batch_size: Annotated[int, Opt(min=1, help="Inputs per batch (bounds memory).")] = 256,
    input_key: opt.InputKeyOpt = None,
    y_key: opt.YKeyOpt = "y",
    target: opt.TargetOpt = None,
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
    """Fit a temperature (classification) or a scale of the predictive spread
    (regression) on held-out data; write a calibrated copy that predict applies."""
    sink = Output(json_mode=json, quiet=quiet)
    import bnnify

    options = dict(samples=samples, task=task, output=out, batch_size=batch_size, seed=seed)
    options |= dict(x_key=input_key or "x", y_key=y_key, target=target, model_args=model_arg)
    options |= dict(class_dim=class_dim, device=device, arch=arch, arch_kwargs=arch_kwargs)
    with reporting(sink, "Calibrating"):
        result = bnnify.calibrate(
            checkpoint, model, data, trust_pickle=trust_pickle, force=force, **options
        )
    _render(sink, result.to_json())


def _render(out: Output, info: dict[str, Any]) -> None:
    out.json(info)
    parameter = info["parameter"]
    data = info["data"]
    out.line(
        f"Calibrated on {data['examples']} examples of {data['name']} "
        f"({info['task']}, {info['samples']} weight samples)"
    )
    title = f"{parameter}, and validation metrics before → after it"
    table = Table(title=title, title_justify="left")
    table.add_column("model")
    table.add_column(parameter, justify="right")
    keys = [k for k in info["bayesian"]["before"] if k in _SHOWN]
    for key in keys:
        table.add_column(key, justify="right")
    for model in ("bayesian", "mean_weights"):
        entry = info[model]
        cells = [f"{_number(entry['before'][k])} → {_number(entry['after'][k])}" for k in keys]
        table.add_row(model.replace("_", " "), f"{entry[parameter]:.4g}", *cells)
    out.table(table)
    out.line(f"  wrote {info['output']}")


_SHOWN = ("nll", "ece", "brier", "coverage_90", "calibration_error", "crps")


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
