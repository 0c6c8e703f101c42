"""Input files: a named path checked to be a regular file before anything reads it."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from bnnify.errors import InputError

__all__ = ["file_kind", "open_regular", "regular_file"]

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_kind(mode: int) -> str:
    """What a `st_mode` describes: "a regular file", "a FIFO (named pipe)", ..."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def regular_file(path: str | Path, what: str = "input file") -> Path:
    """`path`, checked to be a regular file once symbolic links are followed.

    Reading a FIFO, a socket or a device blocks or never ends, and a directory is not a
    file: each is refused with a message saying what it is.

    Args:
        path: The path as the user gave it (kept in messages).
        what: What the file is for, such as "data file".

    Raises:
        InputError: `path` does not exist, cannot be examined, or is not a regular file.

    Example:
        >>> regular_file("/", "data file")
        Traceback (most recent call last):
        ...
        bnnify.errors.InputError: data file '/' is a directory, not a regular file
        ...
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        dangling = os.path.islink(path)
        raise InputError(
            f"{what} '{path}' "
            + ("is a symbolic link to a missing file" if dangling else "does not exist"),
            hint="Check the path.",
        ) from None
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the name
        raise _unreadable(path, what, error) from None
    _check_mode(path, what, mode)
    return path


def open_regular(path: str | Path, what: str = "input file") -> BinaryIO:
    """Opens `path` for binary reading, refusing anything but a regular file.

    The file is opened without blocking (a FIFO with no writer would block `open`) and
    the opened file itself is examined, so a file swapped after a check is still caught.

    Raises:
        InputError: As `regular_file`, or the file cannot be opened.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError) as error:
        regular_file(path, what)  # says what the path is, if that is the problem
        raise _unreadable(path, what, error) from None
    try:
        _check_mode(path, what, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_mode(path: Path, what: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise InputError(
            f"{what} '{path}' is {file_kind(mode)}, not a regular file",
            hint="Pass a regular file: bnnify does not read pipes, devices or sockets.",
        )


def _unreadable(path: Path, what: str, error: Exception) -> InputError:
    reason = getattr(error, "strerror", None) or str(error)
    return InputError(
        f"cannot read {what} '{path}': {reason}", hint="Check the path and its permissions."
    )
