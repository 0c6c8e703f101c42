"""`bnnify list`: the registered posteriors and priors with their arguments."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from bnnify.catalog import POSTERIORS, PRIORS
from bnnify.cli.options import JsonOpt
from bnnify.cli.output import Output, command

__all__ = ["list_registered"]


@command
def list_registered(json: JsonOpt = False) -> None:
    """List the posteriors and priors you can name in a spec or with --posterior/--prior."""
    out = Output(json_mode=json)
    data = {
        kind: [
            {
                "name": name,
                "aliases": list(aliases),
                "class": cls,
                "arguments": args,
                "description": text,
            }
            for name, (aliases, cls, args, text) in table.items()
        ]
        for kind, table in (("posteriors", POSTERIORS), ("priors", PRIORS))
    }
    out.json(data)
    for kind, rows in data.items():
        table = Table(title=kind.capitalize(), title_justify="left")
        for column in ("name", "aliases", "arguments (defaults)", "description"):
            table.add_column(column, overflow="fold")
        for row in rows:
            args = ", ".join(f"{k}={v!r}" for k, v in row["arguments"].items())
            table.add_row(
                Text(row["name"]),
                Text(", ".join(row["aliases"])),
                Text(args),
                Text(row["description"]),
            )
        out.table(table)
