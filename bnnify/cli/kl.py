"""`bnnify kl`: the KL divergence of a variational checkpoint (or a saved KL report)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bnnify.cli import options as opt
from bnnify.cli.output import Output, command
from bnnify.cli.reporting import reporting
from bnnify.cli.tables import kl_line, kl_table, select_rows
from bnnify.enums import Reduction

__all__ = ["kl"]

PathArg = Annotated[
    Path,
    typer.Argument(
        help="Variational checkpoint (its sharded index, or their folder), or a KL report."
    ),
]
ReductionOpt = Annotated[
    Reduction, typer.Option(help="Report the sum over elements or the mean per element.")
]
TopOpt = Annotated[
    int | None,
    typer.Option(
        min=0,
        metavar="N",
        help="Only the N parameters of largest KL, largest first (0: all) [table default: "
        "10; --json default: all, in storage order].",
    ),
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
    top: TopOpt = None,
    filter: opt.FilterOpt = None,
    out_path: OutOpt = None,
    device: opt.DeviceOpt = None,
    seed: SeedOpt = None,
    force: opt.ForceOpt = False,
    json: opt.JsonOpt = False,
    quiet: opt.QuietOpt = False,
) -> None:
    """Compute KL(posterior || prior) of a checkpoint, with its stored prior or another one."""
    out = Output(command="kl", json_mode=json, quiet=quiet)
    # The use case, not `bnnify.kl`: the package's API imports torch, and a report is
    # read without it.
    from bnnify.usecases.kl import kl as compute_kl

    with reporting(out, "Computing KL") as progress:
        result = compute_kl(
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
    _render(out, result, top, filter)


def _render(out: Output, result: Any, top: int | None, pattern: str | None) -> None:
    ranked = top is not None or pattern is not None
    data = result.to_json(0 if ranked else None)
    if ranked:
        rows = data["parameters"]
        data["parameters"], _ = select_rows(rows, top=top or 0, pattern=pattern, ranked=True)
    out.json(data)
    out.table(kl_table(result.report, top=10 if top is None else top, pattern=pattern))
    out.line(kl_line(result))
