"""`bnnify predict`: predictions with their uncertainty from a (fitted) checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from bnnify.cli.fit import Task
from bnnify.cli.options import (
    ArchKwargsOpt,
    ArchOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
    TrustPickleOpt,
)
from bnnify.cli.output import Output, command

__all__ = ["predict"]


@command
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="Variational checkpoint (fitted or not).")],
    model: ModelOpt,
    input: Annotated[
        Path, typer.Option("--input", "-i", help="Inputs: safetensors (x), .npy, .npz or CSV.")
    ],
    samples: Annotated[int, typer.Option(min=1, help="Weight samples.")] = 32,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the predictions (safetensors).")
    ] = None,
    keep_samples: Annotated[
        bool, typer.Option(help="Also store every sampled output in --out.")
    ] = False,
    mean_weights: Annotated[
        bool, typer.Option(help="Deterministic prediction with the posterior means.")
    ] = False,
    targets: Annotated[
        Path | None,
        typer.Option("--targets", "--labels", help="Targets or labels: report metrics."),
    ] = None,
    task: Annotated[
        Task | None, typer.Option(help="Default: the fitted task, else regression.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Inputs per batch (bounds memory).")] = 256,
    x_key: Annotated[str, typer.Option(help="Input tensor name.")] = "x",
    y_key: Annotated[str, typer.Option(help="Target tensor name.")] = "y",
    seed: Annotated[
        int, typer.Option(min=0, max=2**31 - 1, help="Seed of the weight samples.")
    ] = 0,
    device: DeviceOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    force: ForceOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Predict with S weight samples: predictive mean and spread, or class probabilities
    with entropy and mutual information; metrics when targets are given."""
    sink = Output(json_mode=json, quiet=quiet)
    import torch

    from bnnify.formats.atomic import AtomicOutputs
    from bnnify.formats.checkpoint import Checkpoint
    from bnnify.formats.data import load_dataset
    from bnnify.formats.model_files import load_model
    from bnnify.formats.safetensors_io import save_file
    from bnnify.formats.spec import resolve_device
    from bnnify.usecases.predict import noise_of
    from bnnify.usecases.predict import predict as run_predict
    from bnnify.usecases.runner import check_input, open_runner

    device = resolve_device(device)
    read = [checkpoint, model, input, *([targets] if targets else [])]
    outputs = AtomicOutputs([out], force=force, inputs=read) if out else None
    with Checkpoint(checkpoint) as ckpt:
        chosen = task.value if task else (ckpt.fit or {}).get("task", "regression")
        data = load_dataset(
            input, x_key=x_key, y_key=y_key, with_target=False, targets_path=targets
        )
        runner = open_runner(
            load_model(model, trust_pickle=trust_pickle),
            ckpt,
            device=device,
            arch=arch,
            arch_kwargs=arch_kwargs,
        )
        check_input(runner, data.x)
        noise = noise_of(ckpt.fit_tensors()) if chosen == "regression" else None
        if chosen == "regression" and noise is None:
            sink.warn(
                "the checkpoint was not fitted: no noise scale, the predictive spread "
                "is the epistemic part only"
            )
        torch.manual_seed(seed)
        result = run_predict(
            runner,
            data,
            task=chosen,
            samples=samples,
            batch_size=batch_size,
            noise=noise,
            keep_samples=keep_samples,
            mean_weights=mean_weights,
        )
    if outputs is not None:
        with outputs:
            metadata = {
                "bnnify.format": "bnnify.predictions",
                "bnnify.format_version": "1",
                "bnnify.task": chosen,
                "bnnify.samples": str(result.summary["samples"]),
                "bnnify.checkpoint": checkpoint.name,
            }
            save_file(result.tensors, outputs.temp(out), metadata)
    _render(sink, result, out)


def _render(out: Output, result: Any, path: Path | None) -> None:
    out.json(
        {
            "summary": result.summary,
            "metrics": result.metrics,
            "output": None if path is None else str(path),
        }
    )
    summary = result.summary
    out.line(
        f"Predicted {summary['examples']} examples ({summary['task']}, "
        f"{summary['samples']} weight sample(s))"
    )
    for key, value in summary.items():
        if key not in ("examples", "task", "samples", "mean_weights"):
            out.line(f"  {key}: {value if isinstance(value, list) else f'{value:.5g}'}")
    if result.metrics:
        names = list(result.metrics)
        table = Table(title="Metrics", title_justify="left")
        table.add_column("metric")
        for name in names:
            table.add_column(name.replace("_", " "), justify="right")
        keys = list(result.metrics[names[0]])
        for key in keys:
            table.add_row(key, *[f"{result.metrics[n].get(key, float('nan')):.5g}" for n in names])
        out.table(table)
    if path is not None:
        out.line(f"  wrote {path}")
