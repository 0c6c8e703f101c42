"""Tests of bnnify.cli.tables: every command's tables in one style."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from bnnify.cli.tables import table


def render(value) -> str:
    console = Console(width=60, no_color=True, record=True)
    console.print(value)
    return console.export_text()


def test_columns_alignment_and_folding():
    long = "encoder.layers.0.self_attention.query.weight.with.a.very.long.name"
    result = table(
        "Title", ("name", "KL"), [(Text(long), "1.5"), (Text("b"), "10.25")], right={"KL"}
    )
    assert [c.justify for c in result.columns] == ["left", "right"]
    assert all(c.overflow == "fold" for c in result.columns)
    text = render(result)
    assert text.startswith("Title") and "…" not in text
    assert "".join(text.split()).count("self_attention") == 1  # wider than 60: folded, not cut
    fits = "encoder.layers.10.self_attention.query.weight"  # 45 characters
    rows = [(Text(fits), "1.5", "a long description that would take the room")]
    text = render(table("Title", ("name", "KL", "note"), rows, right={"KL"}))
    assert sum(fits in line for line in text.splitlines()) == 1  # whole, on one line


def test_cells_are_not_markup_when_given_as_text():
    text = render(table("T", ("name",), [(Text("[bold]x[/bold]"),)]))
    assert "[bold]x[/bold]" in text
