"""Rich tables in the one style of every command: a title on the left, long cells folded."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

__all__ = ["conversion_table", "number_table", "table"]

CONVERT_COLUMNS = ("name", "shape", "elements", "dtype", "posterior", "prior", "sigma init", "KL")


def table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    right: Collection[str] = (),
) -> Table:
    """A table with `columns` (those in `right` right-aligned) holding `rows`.

    Cells read from files should be `rich.text.Text`, so that they are not parsed as markup.
    """
    result = Table(title=title, title_justify="left")
    for column in columns:
        result.add_column(column, overflow="fold", justify="right" if column in right else "left")
    for row in rows:
        result.add_row(*row)
    return result


def conversion_table(result: Any) -> Table:
    """`bnnify convert -v`: a row per reparametrized parameter of a `ConversionResult`."""
    posterior, prior = result.spec.posterior[0], result.spec.prior[0]
    rows = []
    for p in result.parameters:
        size, sigma, kl = f"{p.numel:,}", f"{p.sigma_mean:.3g}", f"{p.kl:.4g}"
        rows.append((Text(p.name), str(tuple(p.shape)), size, p.dtype, posterior, prior, sigma, kl))
    right = ("elements", "sigma init", "KL")
    return table("Reparametrized parameters", CONVERT_COLUMNS, rows, right=right)


def number_table(title: str, first: str, rows: dict[str, dict[str, Any]]) -> Table:
    """Numbers by row and column (`rows[row][column]`); a missing number reads "n/a".

    The columns are those of the first row; names have their underscores as spaces.
    """
    columns = list(next(iter(rows.values()), {}))
    names = [first, *(c.replace("_", " ") for c in columns)]
    cells = [
        (key, *("n/a" if values.get(c) is None else f"{values[c]:.5g}" for c in columns))
        for key, values in rows.items()
    ]
    return table(title, names, cells, right=names[1:])
