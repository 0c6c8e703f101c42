"""`bnnify plot`: figures of a checkpoint and of its predictions, as PNG or SVG files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bnnify.cli.output import Output, command
from bnnify.cli.reporting import reporting
from bnnify.enums import Figure

__all__ = ["plot"]

Opt = typer.Option
CheckpointArg = Annotated[
    Path | None,
    typer.Argument(help="Variational checkpoint: KL and signal-to-noise per layer, sigma."),
]
PredictionsOpt = Annotated[
    Path | None,
    Opt(
        "--predictions",
        "-p",
        help="Predictions file of `bnnify predict --out` (with --targets): reliability "
        "or coverage; with --keep-samples --keep-inputs, the 1-D bands.",
    ),
]
FigureOpt = Annotated[
    list[Figure] | None,
    Opt("--figure", help="Draw only this figure (repeatable); default: all the inputs allow."),
]
OutDirOpt = Annotated[
    Path | None, Opt("--out-dir", "-o", help="Folder of the figures (default: beside the input).")
]
FormatOpt = Annotated[str, Opt("--format", help="png or svg.")]
SeedOpt = Annotated[int | None, Opt(min=0, help="Seed of Monte Carlo KL estimates.")]


@command
def plot(
    checkpoint: CheckpointArg = None,
    predictions: PredictionsOpt = None,
    figure: FigureOpt = None,
    out_dir: OutDirOpt = None,
    image_format: FormatOpt = "png",
    seed: SeedOpt = None,
    force: Annotated[bool, Opt("--force", "-f", help="Overwrite existing figures.")] = False,
    json: Annotated[bool, Opt("--json", help="Print one JSON object on stdout.")] = False,
    quiet: Annotated[bool, Opt("--quiet", "-q", help="Print nothing but errors.")] = False,
) -> None:
    """Draw the figures of a checkpoint and/or a predictions file (needs matplotlib:
    pip install 'bnnify\\[plot]')."""
    sink = Output(json_mode=json, quiet=quiet)
    import bnnify

    with reporting(sink, "Drawing"):
        result = bnnify.plot(
            checkpoint,
            predictions,
            figures=figure,
            out_dir=out_dir,
            image_format=image_format,
            seed=seed,
            force=force,
        )
    _render(sink, result.to_json())


def _render(out: Output, info: dict[str, Any]) -> None:
    out.json(info)
    for name, figure in info["figures"].items():
        out.line(f"{name}: wrote {figure['path']}{_headline(figure['drawn'])}")
    for name, reason in info["skipped"].items():
        out.line(f"{name}: skipped ({reason})")


def _headline(drawn: dict[str, Any]) -> str:
    for key in ("ece", "calibration_error"):
        if key in drawn:
            return f" ({key.replace('_', ' ')} {drawn[key]:.4g})"
    return ""
