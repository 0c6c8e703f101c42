"""One output sink per command: results to stdout, logs and errors to stderr.

Everything printed passes through `sanitize`: names and metadata come from files, and
a control character in them must not reach the terminal as one (an escape sequence can
recolour, hide or rewrite what the user reads, or plant a hyperlink).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from bnnify.errors import (
    EXIT_INTERRUPTED,
    EXIT_RUNTIME,
    BnnifyError,
    InputError,
    InvalidArgumentError,
    clip,
)
from bnnify.usecases import LOGGER_NAME

__all__ = [
    "Output",
    "closed_stdout",
    "command",
    "human_bytes",
    "json_text",
    "sanitize",
    "schema_name",
]

F = TypeVar("F", bound=Callable[..., Any])


class Output:
    """Where a command writes: data on stdout (a table, or JSON), the rest on stderr.

    Args:
        command: The command's name: its JSON carries `"schema": "bnnify.<command>/1"`.
        json_mode: Print one JSON object on stdout instead of tables.
        quiet: Print nothing but errors and the requested JSON (logs are silenced, not data).
        verbose: Show detail (per-parameter rows, info logs).
    """

    def __init__(
        self,
        *,
        command: str | None = None,
        json_mode: bool = False,
        quiet: bool = False,
        verbose: bool = False,
    ):
        self.command = command
        self.json_mode = json_mode
        self.quiet = quiet
        self.verbose = verbose
        no_color = bool(os.environ.get("NO_COLOR"))
        self.out = _SafeConsole(highlight=False, no_color=no_color)
        if not self.out.is_terminal and "COLUMNS" not in os.environ:
            # Piped tables would otherwise be folded to 80 columns.
            self.out = _SafeConsole(highlight=False, no_color=no_color, width=160)
        self.err = _stderr()

    def stdout_is_data(self, *, json_flag: str | None = None) -> None:
        """Stdout carries a data stream (`-o -`): results and tables move to stderr.

        Raises:
            InvalidArgumentError: `json_flag` (--json) asks for JSON on stdout too.
        """
        if json_flag:
            raise InvalidArgumentError(
                f"-o - writes the data to stdout, where {json_flag} would write too",
                hint="Write the data to a file with -o FILE, or drop --json.",
            )
        self.out = self.err

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
            _sanitize_table(table)
            self.out.print(table)

    def line(self, message: str) -> None:
        """A result line on stdout (human mode only)."""
        if not self.quiet and not self.json_mode:
            self.out.print(escape(message))

    def json(self, data: Any, *, schema: str | None = None) -> None:
        """The JSON result on stdout (JSON mode only, --quiet included: it is the data).

        Args:
            data: A JSON object; its `schema` key is set first (from `schema`, else the
                command's name) unless it has one.
            schema: The schema's name when it is not the command's, e.g. "fit.epoch".
        """
        if self.json_mode:
            self._write(json_text(self._stamped(data, schema), indent=2))

    def json_line(self, data: Any, *, schema: str | None = None) -> None:
        """One JSON object on one line of stdout (JSON Lines: a record of a stream)."""
        if self.json_mode:
            self._write(json_text(self._stamped(data, schema)))

    def _stamped(self, data: Any, schema: str | None) -> Any:
        name = schema or self.command
        if not isinstance(data, dict) or name is None or "schema" in data:
            return data
        return {"schema": schema_name(name), **data}

    @staticmethod
    def _write(text: str) -> None:
        sys.stdout.write(text + "\n")
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
            task = bar.add_task(escape(sanitize(description)), total=total)
            yield lambda n: bar.advance(task, n)


_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def sanitize(text: str) -> str:
    r"""`text` with control characters written as escapes, safe to print on a terminal.

    C0 and C1 controls (ESC, BEL, CR, NUL, newline, CSI...) and the Unicode line
    separators and bidirectional overrides become `\xHH` or `\uHHHH`.

    Example:
        >>> sanitize("fc\x1b[31m.weight\x07")
        'fc\\x1b[31m.weight\\x07'
    """
    return _UNSAFE.sub(_escape_char, text)


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class _SafeConsole(Console):
    """A console whose strings (lines, messages, table titles and cells) are sanitized.

    Rich turns every `str` it prints into `Text` through `render_str`, measuring
    included, so that is where the sanitizer sits; `Text` cells are cleaned by
    `Output.table`.
    """

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(sanitize(text), **kwargs)

    def on_broken_pipe(self) -> None:
        """A closed pipe: on stderr, stop drawing and go on; on stdout, end as `command`
        does (exit 0). Rich's own handler exits 1."""
        if self.stderr:
            self.quiet = True
            return
        raise BrokenPipeError(errno.EPIPE, "stdout was closed")


def _sanitize_table(table: Table) -> None:
    """Cleans, in place, the parts of `table` held as `Text` (they skip `render_str`)."""
    parts: list[Any] = [table.title, table.caption]
    for column in table.columns:
        parts += [column.header, column.footer, *column.cells]
    for part in parts:
        if isinstance(part, Text):
            part.plain = sanitize(part.plain)


def _stderr() -> Console:
    """The stderr console; lines are not wrapped when it is not a terminal (logs, pipes)."""
    console = _SafeConsole(stderr=True, highlight=False, no_color=bool(os.environ.get("NO_COLOR")))
    if not console.is_terminal:
        console.soft_wrap = True
    return console


def schema_name(command: str) -> str:
    """The versioned name of a command's JSON schema, its first key: `bnnify.<command>/1`."""
    return f"bnnify.{command}/{SCHEMA_VERSION}"


SCHEMA_VERSION = 1


def json_text(data: Any, *, indent: int | None = None) -> str:
    """`data` as strict JSON: paths as strings, tensors as lists, never NaN or Infinity.

    A non-finite number becomes null, except a KL divergence (under a key `kl` or
    `kl_*`): a KL that is not finite is an error, never data.

    Raises:
        InputError: A KL divergence in `data` is NaN or infinite.
    """
    return json.dumps(_plain(data, ()), indent=indent, allow_nan=False)


def _plain(value: Any, keys: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v, (*keys, str(k))) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, keys) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _non_finite(value, keys)
    if hasattr(value, "tolist"):
        return _plain(value.tolist(), keys)
    return str(value)


def _non_finite(value: float, keys: tuple[str, ...]) -> None:
    if any(k == "kl" or k.startswith("kl_") for k in keys):
        raise InputError(
            f"the KL divergence ({'.'.join(keys)}) is {value}: the posterior and prior do "
            "not give a finite KL, so there is no result to report",
            hint="Check the prior's arguments and the checkpoint's spreads (bnnify inspect).",
        )
    return None


def command(function: F) -> F:
    """Maps bnnify errors to `Error: ...` on stderr and their exit code, no traceback.

    While the command runs, log records and Python warnings go through the same sink:
    bnnify's warnings as `Warning:` lines, other libraries' records (torch logs
    tracebacks of a corrupt file) only with BNNIFY_DEBUG=1.
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        err = _stderr()
        debug = bool(os.environ.get("BNNIFY_DEBUG"))
        try:
            with _routed_logs(err, debug):
                return function(*args, **kwargs)
        except BnnifyError as error:
            err.print(f"[bold red]Error:[/bold red] {escape(error.message)}")
            if error.hint:
                err.print(f"[dim]Hint:[/dim] {escape(error.hint)}")
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            from bnnify.formats.interrupts import remove_tracked

            remove_tracked()
            err.print("[bold red]Interrupted[/bold red]; no partial or temporary file is left.")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            # The reader of stdout is gone (`| head -1`): what it wanted it has; the files
            # were written before the results were printed. Quiet success, as Unix tools end.
            closed_stdout()
            raise typer.Exit(0) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as error:  # a bug, not a user mistake: say so briefly
            if debug:
                _print_lines(err, traceback.format_exc())
            err.print(
                f"[bold red]Error:[/bold red] internal error: "
                f"{escape(type(error).__name__)}: {escape(clip(str(error)))}"
            )
            err.print("[dim]Hint:[/dim] set BNNIFY_DEBUG=1 for the traceback and report it.")
            raise typer.Exit(EXIT_RUNTIME) from None

    return wrapper  # type: ignore[return-value]


def closed_stdout() -> None:
    """Points stdout at /dev/null after its pipe closed, so that no later write or the
    interpreter's last flush fails (Python would print `BrokenPipeError` and exit 120)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (a test's capture): nothing to do
        pass
    finally:
        os.close(devnull)


def _print_lines(err: Console, text: str) -> None:
    """Multi-line text (a traceback), each line sanitized on its own."""
    for line in text.rstrip("\n").splitlines():
        err.print(line, markup=False)


class _SinkHandler(logging.Handler):
    """bnnify's log records on stderr: warnings always, everything in debug mode."""

    def __init__(self, err: Console, debug: bool):
        super().__init__(logging.DEBUG if debug else logging.WARNING)
        self.err = err

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.err.print(f"[yellow]Warning:[/yellow] {escape(record.getMessage())}")
        else:
            self.err.print(f"[dim]{record.levelname.lower()}:[/dim] {escape(record.getMessage())}")


@contextmanager
def _routed_logs(err: Console, debug: bool) -> Iterator[None]:
    """Sends bnnify's log records and Python warnings to the sink while a command runs.

    Other libraries' records are switched off (torch logs whole tracebacks on its own
    stderr handlers when a file is corrupt, and may be imported only later by the
    command); BNNIFY_DEBUG=1 leaves them on.
    """
    own = logging.getLogger("bnnify")
    sink = _SinkHandler(err, debug)
    own.addHandler(sink)
    previous, level = logging.root.manager.disable, own.level
    exempt = [own, logging.getLogger(LOGGER_NAME)]
    if debug:
        own.setLevel(logging.DEBUG)
    else:
        logging.disable(logging.CRITICAL)
        # The global switch, lifted for bnnify's own loggers (an instance attribute each).
        for logger in exempt:
            logger.isEnabledFor = functools.partial(_enabled, logger)  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings():
            warnings.showwarning = functools.partial(_show_warning, err)
            yield
    finally:
        own.removeHandler(sink)
        for logger in exempt:
            logger.__dict__.pop("isEnabledFor", None)
        own.setLevel(level)
        logging.disable(previous)


def _enabled(logger: logging.Logger, level: int) -> bool:
    return level >= logger.getEffectiveLevel()


def _show_warning(err: Console, message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    err.print(f"[yellow]Warning:[/yellow] {escape(str(message))}")


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"
