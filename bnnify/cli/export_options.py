"""The options of `bnnify export` and `bnnify prune`, declared once (re-exported by `options`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnnify.enums import ExportFormat, PruneScope, Task

__all__ = [
    "AleatoricOpt",
    "AnyCheckpointArg",
    "DefaultTaskOpt",
    "ExportFlagOpt",
    "ExportFormatOpt",
    "ExportInputOpt",
    "ExportOutOpt",
    "ExportSeedOpt",
    "KeepOpt",
    "OptionalModelOpt",
    "PruneDataOpt",
    "PruneOutOpt",
    "SamplesOpt",
    "ScopeOpt",
    "SnrThresholdOpt",
    "TargetsOpt",
    "WeightsOpt",
]

AnyCheckpointArg = Annotated[Path, typer.Argument(help="Variational checkpoint (fitted or not).")]

OptionalModelOpt = Annotated[
    Path | None,
    typer.Option(
        "--model",
        "-m",
        help="The model file the checkpoint was converted from (needed with --data or --export).",
    ),
]
ExportFormatOpt = Annotated[
    ExportFormat | None,
    typer.Option(
        "--format",
        help="Written format (default: the model's own; for an ensemble, torchscript or export).",
    ),
]
WeightsOpt = Annotated[
    str,
    typer.Option(
        help="mean (posterior means), sample (one sample, --seed) or ensemble:K (K samples "
        "in one module returning their mean and standard deviation)."
    ),
]
ExportSeedOpt = Annotated[int, typer.Option(min=0, max=2**31 - 1, help="Seed of the samples.")]
ExportInputOpt = Annotated[
    Path | None,
    typer.Option(
        "--input",
        "-i",
        help="Example inputs (safetensors x, .npy, .npz, CSV): to trace torch.export programs "
        "and to check the written model against bnnify's predictions.",
    ),
]
AleatoricOpt = Annotated[
    bool,
    typer.Option(
        "--aleatoric",
        help="Add the fitted noise to an ensemble's std (regression; else epistemic).",
    ),
]
ExportOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Output file (default: beside the checkpoint, <stem> . <weights> . <format ending>).",
    ),
]
KeepOpt = Annotated[
    float | None,
    typer.Option(min=0.0, max=1.0, help="Fraction of weights to keep (highest |mu|/sigma)."),
]
SnrThresholdOpt = Annotated[
    float | None, typer.Option(min=0.0, help="Prune every weight with |mu|/sigma below this.")
]
ScopeOpt = Annotated[
    PruneScope, typer.Option(help="Rank --keep over all weights (global) or per layer.")
]
PruneOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Output file (default: beside the checkpoint, <stem> + .pruned.safetensors).",
    ),
]
PruneDataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data", "-d", help="Data with targets: metrics before and after (and export inputs)."
    ),
]
TargetsOpt = Annotated[
    Path | None, typer.Option("--targets", "--labels", help="Targets or labels given apart.")
]
SamplesOpt = Annotated[int, typer.Option(min=1, help="Weight samples for the metrics.")]
ExportFlagOpt = Annotated[
    bool, typer.Option("--export", help="Write a plain model (see `bnnify export`) instead.")
]
DefaultTaskOpt = Annotated[
    Task | None,
    typer.Option(
        help="regression or classification (default: the checkpoint's fitted task, else "
        "regression); an ensemble of a classifier averages probabilities."
    ),
]
