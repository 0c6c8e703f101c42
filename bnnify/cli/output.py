"""One output sink per command: results to stdout, logs and errors to stderr."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from bnnify.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, BnnifyError

__all__ = ["Output", "command", "human_bytes"]

F = TypeVar("F", bound=Callable[..., Any])


class Output:
    """Where a command writes: data on stdout (a table, or JSON), the rest on stderr.

    Args:
        json_mode: Print one JSON object on stdout instead of tables.
        quiet: Print nothing but errors.
        verbose: Show detail (per-parameter rows, info logs).
    """

    def __init__(self, *, json_mode: bool = False, quiet: bool = False, verbose: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        self.verbose = verbose
        no_color = bool(os.environ.get("NO_COLOR"))
        self.out = Console(highlight=False, no_color=no_color)
        if not self.out.is_terminal and "COLUMNS" not in os.environ:
            # Piped tables would otherwise be folded to 80 columns.
            self.out = Console(highlight=False, no_color=no_color, width=160)
        self.err = _stderr()

    def log(self, message: str) -> None:
        """An informational line on stderr (hidden by --quiet and --json)."""
        if not self.quiet and not self.json_mode:
            self.err.print(escape(message))

    def detail(self, message: str) -> None:
        """A line shown only with --verbose, on stderr."""
        if self.verbose and not self.quiet:
            self.err.print(escape(message))

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.err.print(f"[yellow]Warning:[/yellow] {escape(message)}")

    def table(self, table: Table) -> None:
        if not self.quiet and not self.json_mode:
            self.out.print(table)

    def line(self, message: str) -> None:
        """A result line on stdout (human mode only)."""
        if not self.quiet and not self.json_mode:
            self.out.print(escape(message))

    def json(self, data: Any) -> None:
        """The JSON result on stdout (JSON mode only)."""
        if self.json_mode and not self.quiet:
            sys.stdout.write(json.dumps(data, indent=2, default=_jsonable) + "\n")
            sys.stdout.flush()

    @contextmanager
    def progress(self, total: int, description: str) -> Iterator[Callable[[int], None]]:
        """Yields `advance(n)`; a bar is drawn only when stderr is a terminal."""
        if self.quiet or not self.err.is_terminal or total <= 0:
            yield lambda n: None
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.err, transient=True) as bar:
            task = bar.add_task(escape(description), total=total)
            yield lambda n: bar.advance(task, n)


def _stderr() -> Console:
    """The stderr console; lines are not wrapped when it is not a terminal (logs, pipes)."""
    console = Console(stderr=True, highlight=False, no_color=bool(os.environ.get("NO_COLOR")))
    if not console.is_terminal:
        console.soft_wrap = True
    return console


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def command(function: F) -> F:
    """Maps bnnify errors to `Error: ...` on stderr and their exit code, no traceback."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        err = _stderr()
        try:
            return function(*args, **kwargs)
        except BnnifyError as error:
            err.print(f"[bold red]Error:[/bold red] {escape(error.message)}")
            if error.hint:
                err.print(f"[dim]Hint:[/dim] {escape(error.hint)}")
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            err.print("[bold red]Interrupted[/bold red]; no output was written.")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as error:  # a bug, not a user mistake: say so briefly
            if os.environ.get("BNNIFY_DEBUG"):
                traceback.print_exc()
            err.print(
                f"[bold red]Error:[/bold red] internal error: "
                f"{escape(type(error).__name__)}: {escape(str(error))}"
            )
            err.print("[dim]Hint:[/dim] set BNNIFY_DEBUG=1 for the traceback and report it.")
            raise typer.Exit(EXIT_RUNTIME) from None

    return wrapper  # type: ignore[return-value]


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"
