"""`bnnify kl`: the KL divergence of a variational checkpoint (or a saved KL report)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from bnnify.cli import options as opt
from bnnify.cli.output import Output, command
from bnnify.cli.reporting import reporting
from bnnify.cli.tables import table
from bnnify.enums import Reduction

__all__ = ["kl"]

COLUMNS = ("parameter", "elements", "KL (sum)", "KL (mean)", "share")
PathArg = Annotated[
    Path, typer.Argument(help="Variational checkpoint (or its sharded index), or a KL report.")
]
ReductionOpt = Annotated[
    Reduction, typer.Option(help="Report the sum over elements or the mean per element.")
]
TopOpt = Annotated[
    int, typer.Option(min=0, help="Rows of the per-parameter table, largest KL first (0: all).")
]
OutOpt = Annotated[
    Path | None, typer.Option("--out", "-o", help="Write the KL report to this file.")
]
SeedOpt = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="Seed of Monte Carlo noise (default: the "
        "checkpoint's; reproduces its conversion report).",
    ),
]


@command
def kl(
    path: PathArg,
    prior: opt.PriorOpt = None,
    prior_arg: opt.PriorArgOpt = None,
    reduction: ReductionOpt = Reduction.SUM,
    mc_samples: opt.McSamplesOpt = None,
    top: TopOpt = 10,
    out_path: OutOpt = None,
    device: opt.DeviceOpt = None,
    seed: SeedOpt = None,
    force: opt.ForceOpt = False,
    json: opt.JsonOpt = False,
    quiet: opt.QuietOpt = False,
) -> None:
    """Compute KL(posterior || prior) of a checkpoint, with its stored prior or another one."""
    out = Output(json_mode=json, quiet=quiet)
    import bnnify

    with reporting(out, "Computing KL") as progress:
        result = bnnify.kl(
            path,
            prior=prior,
            prior_args=prior_arg or (),
            reduction=reduction,
            mc_samples=mc_samples,
            device=device,
            seed=seed,
            output=out_path,
            force=force,
            progress=progress,
        )
    _render(out, result, top)


def _render(out: Output, result: Any, top: int) -> None:
    out.json(result.to_json())
    report = result.report
    order = sorted(range(len(report.names)), key=lambda i: -float(report.per_parameter[i]))
    shown = order if top == 0 else order[:top]
    total = report.total or 1.0
    rows = []
    for i in shown:
        k, n = float(report.per_parameter[i]), int(report.numels[i])
        share = f"{100 * k / total:.1f}%"
        rows.append((Text(report.names[i]), f"{n:,}", f"{k:.6g}", f"{k / max(n, 1):.4g}", share))
    title = f"KL by parameter (largest {len(shown)} of {len(order)})"
    out.table(table(title, COLUMNS, rows, right=COLUMNS[1:]))
    method = "analytic" if report.samples is None else f"Monte Carlo, {report.samples} samples"
    out.line(
        f"KL ({result.reduction}): {result.value:.8g}  [{report.prior['name']} prior, {method}, "
        f"{int(report.numels.sum()):,} elements]"
    )
