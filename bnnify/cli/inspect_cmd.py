"""`bnnify inspect`: what a variational checkpoint holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from bnnify.cli.options import JsonOpt, QuietOpt
from bnnify.cli.output import Output, command, human_bytes
from bnnify.cli.tables import table

__all__ = ["inspect"]

COLUMNS = ("name", "shape", "dtype", "sigma mean", "sigma min", "sigma max", "|mu|/sigma median")


@command
def inspect(
    path: Annotated[Path, typer.Argument(help="Variational checkpoint (or its sharded index).")],
    top: Annotated[int, typer.Option(min=0, help="Rows of the per-parameter table (0: all).")] = 20,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show a checkpoint's metadata, per-parameter sigma and signal-to-noise |mu|/sigma."""
    out = Output(command="inspect", json_mode=json, quiet=quiet)
    import bnnify

    info = bnnify.inspect(path).to_json()
    out.json(info)
    _render(out, info, top)


def _render(out: Output, info: dict[str, Any], top: int) -> None:
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
            f"{source.get('name')} ({source.get('format')}), sha256 {source.get('sha256')}",
        ),
        ("posterior", f"{spec['posterior']['name']} {spec['posterior']['kwargs']}"),
        ("prior", f"{spec['prior']['name']} {spec['prior']['kwargs']}"),
        ("include / exclude", f"{spec['include']} / {spec['exclude']}"),
        ("seed", str(spec["seed"])),
        ("reparametrized", f"{len(params)} parameters, {info['variational_elements']:,} elements"),
        ("deterministic", f"{len(info['deterministic'])} tensors"),
    ]
    if info["fit"]:
        fit = info["fit"].items()
        rows.append(
            ("fit", ", ".join(f"{k}={v}" for k, v in fit if not isinstance(v, (dict, list))))
        )
    for key, value in rows:
        summary.add_row(key, Text(value))
    out.table(summary)
    shown = params if top == 0 else params[:top]
    stats = ("sigma_mean", "sigma_min", "sigma_max", "snr_median")
    cells = [
        (Text(p["name"]), str(tuple(p["shape"])), p["dtype"], *(f"{p[k]:.3g}" for k in stats))
        for p in shown
    ]
    title = f"Parameters ({len(shown)} of {len(params)})"
    out.table(table(title, COLUMNS, cells, right=COLUMNS[3:]))
