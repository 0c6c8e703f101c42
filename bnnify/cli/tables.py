"""Rich tables in the one style of every command: a title on the left, long cells folded."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

from rich.table import Table

__all__ = ["table"]


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
