"""`bnnify inspect`: what a variational checkpoint holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from bnnify.cli.options import JsonOpt, QuietOpt
from bnnify.cli.output import Output, command, human_bytes

__all__ = ["inspect"]


@command
def inspect(
    path: Annotated[Path, typer.Argument(help="Variational checkpoint (or its sharded index).")],
    top: Annotated[int, typer.Option(min=0, help="Rows of the per-parameter table (0: all).")] = 20,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show a checkpoint's metadata, per-parameter sigma and signal-to-noise |mu|/sigma."""
    out = Output(json_mode=json, quiet=quiet)
    from bnnify.formats.checkpoint import Checkpoint
    from bnnify.usecases.analysis import parameter_stats

    with Checkpoint(path) as ckpt:
        files = sorted(set(ckpt.files.values()) | {ckpt.path})
        size = sum(f.stat().st_size for f in files)
        info = {
            "path": str(path),
            "files": [str(f) for f in files],
            "bytes": size,
            "format": ckpt.metadata["bnnify.format"],
            "format_version": ckpt.metadata["bnnify.format_version"],
            "bnnify_version": ckpt.metadata.get("bnnify.version"),
            "torch_version": ckpt.metadata.get("torch.version"),
            "source": ckpt.source,
            "spec": ckpt.spec.to_json(),
            "fit": ckpt.fit,
            "variational_elements": ckpt.num_elements(),
            "deterministic": {n: r.to_json() for n, r in ckpt.deterministic.items()},
            "parameters": parameter_stats(ckpt),
        }
    out.json(info)
    _render(out, info, top)


def _render(out: Output, info: dict[str, Any], top: int) -> None:
    summary = Table(show_header=False, title="Checkpoint", title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    spec = info["spec"]
    rows = [
        ("file", f"{info['path']} ({human_bytes(info['bytes'])}, {len(info['files'])} file(s))"),
        ("format", f"{info['format']} v{info['format_version']}"),
        ("made by", f"bnnify {info['bnnify_version']}, torch {info['torch_version']}"),
        (
            "source",
            f"{info['source'].get('name')} ({info['source'].get('format')}), "
            f"sha256 {info['source'].get('sha256')}",
        ),
        ("posterior", f"{spec['posterior']['name']} {spec['posterior']['kwargs']}"),
        ("prior", f"{spec['prior']['name']} {spec['prior']['kwargs']}"),
        ("include / exclude", f"{spec['include']} / {spec['exclude']}"),
        ("seed", str(spec["seed"])),
        (
            "reparametrized",
            f"{len(info['parameters'])} parameters, {info['variational_elements']:,} elements",
        ),
        ("deterministic", f"{len(info['deterministic'])} tensors"),
    ]
    if info["fit"]:
        rows.append(
            (
                "fit",
                ", ".join(
                    f"{k}={v}" for k, v in info["fit"].items() if not isinstance(v, (dict, list))
                ),
            )
        )
    for key, value in rows:
        summary.add_row(key, Text(value))
    out.table(summary)
    params = info["parameters"]
    shown = params if top == 0 else params[:top]
    table = Table(title=f"Parameters ({len(shown)} of {len(params)})", title_justify="left")
    for column in (
        "name",
        "shape",
        "dtype",
        "sigma mean",
        "sigma min",
        "sigma max",
        "|mu|/sigma median",
    ):
        table.add_column(
            column,
            overflow="fold",
            justify="left" if column in ("name", "shape", "dtype") else "right",
        )
    for p in shown:
        table.add_row(
            Text(p["name"]),
            str(tuple(p["shape"])),
            p["dtype"],
            f"{p['sigma_mean']:.3g}",
            f"{p['sigma_min']:.3g}",
            f"{p['sigma_max']:.3g}",
            f"{p['snr_median']:.3g}",
        )
    out.table(table)
