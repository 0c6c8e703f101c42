"""The one exception family of bnnify, with the exit code the CLI maps each error to."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_RUNTIME",
    "EXIT_UNSAFE",
    "EXIT_USAGE",
    "ArgumentTypeError",
    "BnnifyError",
    "DivergedError",
    "FormatError",
    "InputError",
    "InvalidArgumentError",
    "OutputError",
    "OutputExistsError",
    "SpecError",
    "UnknownNameError",
    "UnsafeInputError",
    "UsageError",
    "clip",
    "closest",
    "shorten",
]

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_UNSAFE = 3
EXIT_INTERRUPTED = 130


class BnnifyError(Exception):
    """Base class of every error bnnify raises on purpose.

    Args:
        message: What is wrong, quoting the bad value.
        hint: How to fix it (shown on its own line by the CLI).
    """

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message}\n{self.hint}"


class UsageError(BnnifyError):
    """The invocation or configuration is wrong; the user can fix it by changing it."""

    exit_code = EXIT_USAGE


class SpecError(UsageError, ValueError):
    """A conversion spec (YAML file or flags) is invalid."""


class InvalidArgumentError(UsageError, ValueError):
    """An argument has an invalid value (for example `sigma <= 0`)."""


class ArgumentTypeError(UsageError, TypeError):
    """An argument has the wrong type (for example a tensor where a module is expected)."""


class UnknownNameError(UsageError, KeyError):
    """A name is not in a registry; the message lists the registered names."""

    def __str__(self) -> str:
        # KeyError would repr-quote the message.
        return BnnifyError.__str__(self)


class OutputExistsError(UsageError, FileExistsError):
    """An output file exists and overwriting was not requested."""


class InputError(BnnifyError):
    """An input file cannot be used: unreadable, malformed or inconsistent."""


class FormatError(InputError, ValueError):
    """A file is not in a format bnnify understands, or of an unsupported version."""


class OutputError(BnnifyError):
    """An output file cannot be written: disk full, file too large, an I/O error."""


class DivergedError(BnnifyError):
    """Training stopped: the loss or the parameters became infinite or NaN."""


class UnsafeInputError(BnnifyError):
    """An input needs arbitrary code execution to load and was not trusted explicitly."""

    exit_code = EXIT_UNSAFE


def closest(name: str, choices: Iterable[str]) -> str:
    """Returns `" Did you mean 'x'?"` for the closest choice, or an empty string."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {match[0]!r}?" if match else ""


def shorten(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to about `limit` characters, for quoting values read from files.

    Example:
        >>> shorten("x" * 1000, limit=12)
        "'xxxxxxxx... (1002 characters)"
    """
    if isinstance(value, int) and value.bit_length() > 4 * limit:
        # repr() of an integer over 4300 digits raises; its size is what matters anyway.
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: max(limit - 3, 1)]}... ({len(text)} characters)"


def clip(text: str, limit: int = 200) -> str:
    """The first line of a message from elsewhere (a library's), cut to `limit` characters.

    Example:
        >>> clip("line one\\nline two")
        'line one'
    """
    lines = str(text).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else f"{line[: limit - 3]}..."
