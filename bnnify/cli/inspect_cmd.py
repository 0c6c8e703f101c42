"""`bnnify inspect`: what a variational checkpoint holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from bnnify.cli.options import FilterOpt, JsonOpt, QuietOpt
from bnnify.cli.output import Output, command, human_bytes
from bnnify.cli.tables import plain, select_rows, table

__all__ = ["inspect"]

COLUMNS = ("name", "shape", "dtype", "sigma mean", "sigma min", "sigma max", "|mu|/sigma median")
STATS = ("sigma_mean", "sigma_min", "sigma_max", "snr_median")


@command
def inspect(
    path: Annotated[
        Path,
        typer.Argument(
            help="Variational checkpoint, its sharded index, or the folder holding either."
        ),
    ],
    stats: Annotated[
        bool,
        typer.Option(
            "--stats",
            help="Also read the tensors: sigma and |mu|/sigma per parameter (loads torch; "
            "without, only the metadata is read, in a fraction of a second).",
        ),
    ] = False,
    top: Annotated[int, typer.Option(min=0, help="Rows of the per-parameter table (0: all).")] = 20,
    filter: FilterOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show a checkpoint's metadata and parameters (with --stats, sigma and |mu|/sigma)."""
    out = Output(command="inspect", json_mode=json, quiet=quiet)
    from bnnify.usecases.inspect import inspect as read

    info = read(path, stats=stats).to_json()
    out.json(info)
    _render(out, info, top, filter)


def _render(out: Output, info: dict[str, Any], top: int, pattern: str | None) -> None:
    summary = Table(show_header=False, title="Checkpoint", title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    spec, source = info["spec"], info["source"]
    files = f"{info['path']} ({human_bytes(info['bytes'])}, {len(info['files'])} file(s))"
    params = info["parameters"]
    rows = [
        ("file", files),
        ("format", f"{info['format']} v{info['format_version']}"),
        ("made by", f"bnnify {info['bnnify_version']}, torch {info['torch_version']}"),
        (
            "source",
            f"{plain(source.get('name'))} ({plain(source.get('format'))}), "
            f"sha256 {plain(source.get('sha256'))}",
        ),
        ("posterior", f"{spec['posterior']['name']} {plain(spec['posterior']['kwargs'])}"),
        ("prior", f"{spec['prior']['name']} {plain(spec['prior']['kwargs'])}"),
        ("include / exclude", f"{plain(spec.get('include'))} / {plain(spec.get('exclude'))}"),
        ("seed", plain(spec.get("seed"))),
        ("reparametrized", f"{len(params)} parameters, {info['variational_elements']:,} elements"),
        ("deterministic", f"{len(info['deterministic'])} tensors"),
    ]
    if info["fit"]:
        fit = info["fit"].items()
        rows.append(
            ("fit", ", ".join(f"{k}={plain(v)}" for k, v in fit if not isinstance(v, (dict, list))))
        )
    for key, value in rows:
        summary.add_row(key, Text(value))
    out.table(summary)
    shown, total = select_rows(params, top=top, pattern=pattern)
    with_stats = bool(params) and params[0]["sigma_mean"] is not None
    columns = COLUMNS if with_stats else (*COLUMNS[:3], "elements")
    cells = [
        (
            Text(p["name"]),
            str(tuple(p["shape"])),
            p["dtype"],
            *((f"{p[k]:.3g}" for k in STATS) if with_stats else (f"{p['elements']:,}",)),
        )
        for p in shown
    ]
    out.table(table(f"Parameters ({len(shown)} of {total})", columns, cells, right=columns[3:]))
    if not with_stats:
        out.line("sigma and |mu|/sigma per parameter: bnnify inspect --stats")
