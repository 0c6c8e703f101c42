"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = [
    "ArchKwargsOpt",
    "ArchOpt",
    "DeviceOpt",
    "ForceOpt",
    "JsonOpt",
    "McSamplesOpt",
    "ModelOpt",
    "PriorArgOpt",
    "PriorOpt",
    "QuietOpt",
    "TrustPickleOpt",
    "VerboseOpt",
]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show per-parameter detail.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing output files.")]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="Device to compute on: cpu, cuda, cuda:1, ...")
]
PriorOpt = Annotated[
    str | None,
    typer.Option("--prior", help="Prior name (see `bnnify list`); overrides the spec."),
]
PriorArgOpt = Annotated[
    list[str] | None,
    typer.Option("--prior-arg", help="Prior argument key=value (repeatable), e.g. sigma=0.1."),
]
McSamplesOpt = Annotated[
    int | None,
    typer.Option(
        "--mc-samples",
        min=1,
        help="Monte Carlo samples per element for the KL (default: closed form when known, "
        "else 16).",
    ),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Load a pickled nn.Module. Unpickling runs arbitrary code: only for files you trust.",
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="For a state-dict model: confirm the architecture the spec or checkpoint "
        "names (package.module:callable); building it runs that code.",
    ),
]
ArchKwargsOpt = Annotated[
    str | None,
    typer.Option(
        "--arch-kwargs",
        help="Confirm its arch_kwargs too, as a JSON object (e.g. '{\"hidden\": 32}'); "
        "needed when it has any.",
    ),
]
ModelOpt = Annotated[
    Path, typer.Option("--model", "-m", help="The model file the checkpoint was converted from.")
]
