"""`bnnify kl`: the KL divergence of a variational checkpoint (or a saved KL report)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from bnnify.cli.options import (
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    McSamplesOpt,
    PriorArgOpt,
    PriorOpt,
    QuietOpt,
)
from bnnify.cli.output import Output, command

__all__ = ["kl"]


class Reduction(str, Enum):
    sum = "sum"
    mean = "mean"


@command
def kl(
    path: Annotated[
        Path, typer.Argument(help="Variational checkpoint (or its sharded index), or a KL report.")
    ],
    prior: PriorOpt = None,
    prior_arg: PriorArgOpt = None,
    reduction: Annotated[
        Reduction, typer.Option(help="Report the sum over elements or the mean per element.")
    ] = Reduction.sum,
    mc_samples: McSamplesOpt = None,
    top: Annotated[
        int, typer.Option(min=0, help="Rows of the per-parameter table, largest KL first (0: all).")
    ] = 10,
    out_path: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the KL report to this file.")
    ] = None,
    device: DeviceOpt = None,
    seed: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Seed of Monte Carlo noise (default: the "
            "checkpoint's; reproduces its conversion report).",
        ),
    ] = None,
    force: ForceOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compute KL(posterior || prior) of a checkpoint, with its stored prior or another one."""
    out = Output(json_mode=json, quiet=quiet)
    from bnnify.formats.report import is_report, read_report

    if is_report(path):
        if prior or prior_arg or mc_samples or out_path:
            out.warn("the input is a KL report: --prior, --mc-samples and --out are ignored")
        report = read_report(path)
    else:
        report = _compute(
            out, path, prior, prior_arg or [], mc_samples, device, seed, out_path, force
        )
    _render(out, report, reduction.value, top)


def _compute(
    out: Output,
    path: Path,
    prior: str | None,
    prior_args: list[str],
    mc_samples: int | None,
    device: str | None,
    seed: int | None,
    out_path: Path | None,
    force: bool,
) -> Any:
    from bnnify.formats.atomic import AtomicOutputs
    from bnnify.formats.checkpoint import Checkpoint
    from bnnify.formats.report import write_report
    from bnnify.formats.spec import resolve_device, resolve_spec
    from bnnify.usecases.analysis import checkpoint_kl

    device = resolve_device(device)
    outputs = AtomicOutputs([out_path], force=force, inputs=[path]) if out_path else None
    with Checkpoint(path) as ckpt:
        override = None
        if prior or prior_args:
            base = ckpt.spec.prior
            name = prior or base[0]
            resolved = resolve_spec(None, prior=name, prior_args=prior_args)
            override = resolved.prior
            if prior is None or prior.lower() == base[0]:
                override = (base[0], {**base[1], **resolved.prior[1]})
        with out.progress(ckpt.num_elements(), "Computing KL") as advance:
            report = checkpoint_kl(
                ckpt,
                prior=override,
                mc_samples=mc_samples,
                device=device,
                seed=seed,
                progress=advance,
            )
    if outputs is not None:
        with outputs:
            write_report(report, outputs.temp(out_path))
        out.log(f"wrote {out_path}")
    return report


def _render(out: Output, report: Any, reduction: str, top: int) -> None:
    value = report.total if reduction == "sum" else report.mean
    data = report.to_json()
    data["reduction"] = reduction
    data["kl"] = value
    out.json(data)
    order = sorted(range(len(report.names)), key=lambda i: -float(report.per_parameter[i]))
    shown = order if top == 0 else order[:top]
    table = Table(
        title=f"KL by parameter (largest {len(shown)} of {len(order)})", title_justify="left"
    )
    for column in ("parameter", "elements", "KL (sum)", "KL (mean)", "share"):
        table.add_column(
            column, justify="left" if column == "parameter" else "right", overflow="fold"
        )
    total = report.total or 1.0
    for i in shown:
        k, n = float(report.per_parameter[i]), int(report.numels[i])
        table.add_row(
            Text(report.names[i]),
            f"{n:,}",
            f"{k:.6g}",
            f"{k / max(n, 1):.4g}",
            f"{100 * k / total:.1f}%",
        )
    out.table(table)
    method = "analytic" if report.samples is None else f"Monte Carlo, {report.samples} samples"
    out.line(
        f"KL ({reduction}): {value:.8g}  [{report.prior['name']} prior, {method}, "
        f"{int(report.numels.sum()):,} elements]"
    )
