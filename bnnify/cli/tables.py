"""Rich tables in the one style of every command: a title on the left, names never folded."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from bnnify.cli.output import human_bytes

__all__ = [
    "conversion_lines",
    "conversion_pair",
    "conversion_table",
    "kl_line",
    "kl_table",
    "natural_key",
    "number_table",
    "plain",
    "select_rows",
    "table",
]

CONVERT_COLUMNS = ("name", "shape", "elements", "dtype", "sigma init", "KL")
KL_COLUMNS = ("parameter", "elements", "KL (sum)", "KL (mean)", "share")


def table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    right: Collection[str] = (),
) -> Table:
    """A table with `columns` (those in `right` right-aligned) holding `rows`.

    The first column holds names: it is as wide as its longest name, the other columns
    giving way (a name folded over lines cannot be copied or grepped); only a name wider
    than the whole console is folded, never cut. Cells read from files should be
    `rich.text.Text`, so that they are not parsed as markup.
    """
    rows = list(rows)
    result = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        justify = "right" if column in right else "left"
        if i == 0:
            widest = max((len(str(row[0])) for row in rows), default=0)
            width = max(widest, len(column))
            result.add_column(column, overflow="fold", min_width=width)
        else:
            result.add_column(column, overflow="fold", justify=justify)
    for row in rows:
        result.add_row(*row)
    return result


def natural_key(name: str) -> list[Any]:
    """Sorts `layers.2` before `layers.10`: digit runs compare as numbers.

    Example:
        >>> sorted(["l.10", "l.2", "l.1"], key=natural_key)
        ['l.1', 'l.2', 'l.10']
    """
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in _RUNS.findall(name)]


_RUNS = re.compile(r"\d+|\D+")


def select_rows(
    rows: Sequence[dict[str, Any]], *, top: int, pattern: str | None, ranked: bool = False
) -> tuple[list[dict[str, Any]], int]:
    """The rows whose `name` matches the glob `pattern`, in natural order of their names
    (kept in their order when `ranked`), at most `top` (0: all); and how many matched."""
    chosen = [r for r in rows if pattern is None or fnmatch.fnmatchcase(r["name"], pattern)]
    if not ranked:
        chosen.sort(key=lambda r: natural_key(r["name"]))
    return (chosen if top == 0 else chosen[:top]), len(chosen)


def plain(value: Any) -> str:
    """A value from JSON as a person reads it: no Python repr (`None`, `[]`, `{'a': 1}`).

    Example:
        >>> plain({"delta": 0.1}), plain(None), plain([]), plain(["a", "b"])
        ('delta=0.1', '-', '-', 'a, b')
    """
    if value is None or value == [] or value == {}:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={plain(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(plain(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def conversion_table(result: Any, *, top: int = 0, pattern: str | None = None) -> Table:
    """`bnnify convert -v`: a row per reparametrized parameter of a `ConversionResult`.

    The posterior and prior, the same for every row, are said once (`conversion_pair`).
    """
    rows = [{"name": p.name, "p": p} for p in result.parameters]
    shown, total = select_rows(rows, top=top, pattern=pattern)
    cells = []
    for row in shown:
        p = row["p"]
        size, sigma, kl = f"{p.numel:,}", f"{p.sigma_mean:.3g}", f"{p.kl:.4g}"
        cells.append((Text(p.name), str(tuple(p.shape)), size, p.dtype, sigma, kl))
    title = f"Reparametrized parameters ({len(shown)} of {total})"
    right = ("elements", "sigma init", "KL")
    return table(title, CONVERT_COLUMNS, cells, right=right)


def conversion_pair(result: Any) -> str:
    """The posterior and prior of every parameter of a `ConversionResult`, in one line."""
    posterior, prior = result.spec.posterior, result.spec.prior
    return (
        f"Every parameter: posterior {posterior[0]}{_args(posterior[1])}, "
        f"prior {prior[0]}{_args(prior[1])}"
    )


def conversion_lines(result: Any) -> list[str]:
    """The summary of a `ConversionResult`: what was converted, its KL, the files."""
    method = "analytic" if result.samples is None else f"Monte Carlo, {result.samples} samples"
    verb, source = ("Would convert" if result.dry_run else "Converted"), result.source
    top = [f"{s.name} {100 * s.share:.3g}% ({100 * s.elements_share:.3g}%)" for s in result.top]
    lines = [
        f"{verb} {source['name']} ({source['format']}): {len(result.parameters)} parameters "
        f"reparametrized ({result.elements:,} elements), {len(result.deterministic)} kept "
        "deterministic",
        f"KL divergence: {result.kl_sum:.6g} (mean {result.kl_mean:.6g} per element, {method})",
        f"Largest KL (share of the KL, of the elements): {', '.join(top)}",
    ]
    for path in result.outputs:
        size = human_bytes(path.stat().st_size) if path.exists() else "?"
        lines.append(f"  wrote {path} ({size})")
    return lines + (["Dry run: nothing was written."] if result.dry_run else [])


def kl_table(report: Any, *, top: int, pattern: str | None) -> Table:
    """`bnnify kl`: the parameters of a `KLReport` of largest KL first."""
    rows, matched = select_rows(
        report.to_json(0)["parameters"], top=top, pattern=pattern, ranked=True
    )
    cells = [
        (
            Text(p["name"]),
            f"{p['elements']:,}",
            f"{p['kl']:.6g}",
            f"{p['kl_mean']:.4g}",
            f"{100 * p['share']:.1f}%",
        )
        for p in rows
    ]
    title = f"KL by parameter (largest {len(cells)} of {matched})"
    return table(title, KL_COLUMNS, cells, right=KL_COLUMNS[1:])


def kl_line(result: Any) -> str:
    """`bnnify kl`: the KL of a `KLResult` under its reduction, and how it was computed."""
    report = result.report
    method = "analytic" if report.samples is None else f"Monte Carlo, {report.samples} samples"
    return (
        f"KL ({result.reduction}): {result.value:.8g}  [{report.prior['name']} prior, {method}, "
        f"{report.elements:,} elements]"
    )


def _args(kwargs: dict[str, Any]) -> str:
    return f" ({plain(kwargs)})" if kwargs else ""


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
