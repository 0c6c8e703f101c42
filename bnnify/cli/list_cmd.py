"""`bnnify list`: the registered posteriors and priors with their arguments."""

from __future__ import annotations

from rich.text import Text

from bnnify.cli.options import JsonOpt
from bnnify.cli.output import Output, command
from bnnify.cli.tables import plain, table

__all__ = ["list_registered"]

COLUMNS = ("name", "aliases", "arguments (defaults)", "description")


@command
def list_registered(json: JsonOpt = False) -> None:
    """List the posteriors and priors you can name in a spec or with --posterior/--prior."""
    out = Output(command="list", json_mode=json)
    # Read from the library's source, not imported: `bnnify list` does not load torch.
    from bnnify.catalog import POSTERIORS, PRIORS

    data = {
        kind: [
            {
                "name": name,
                "aliases": list(entry.aliases),
                "class": entry.class_name,
                "arguments": entry.arguments,
                "description": entry.description,
            }
            for name, entry in registry.items()
        ]
        for kind, registry in (("posteriors", POSTERIORS), ("priors", PRIORS))
    }
    out.json(data)
    for kind, rows in data.items():
        cells = []
        for row in rows:
            arguments = ", ".join(
                k if v is None else f"{k}={plain(v)}" for k, v in row["arguments"].items()
            )
            aliases = plain(row["aliases"])
            cells.append(
                [Text(text) for text in (row["name"], aliases, arguments, row["description"])]
            )
        out.table(table(kind.capitalize(), COLUMNS, cells))
