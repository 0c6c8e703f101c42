"""Output files that appear whole or not at all, never clobbering inputs or existing files."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType

from bnnify.errors import OutputExistsError, UsageError

__all__ = ["AtomicOutputs", "atomic_path", "install_sigterm_handler"]

logger = logging.getLogger("bnnify")

# Leaves room for the dot, the random part and the suffix within the usual 255-byte name limit.
_MAX_STEM = 200


class AtomicOutputs:
    """Writes several output files through temporary files, committed together.

    Every check that can fail is done on construction, before any work, so a command fails
    fast. Inside the `with` block, write each output to `temp(path)`, a hidden file in the
    destination folder. On normal exit the temporary files are flushed to disk and renamed
    onto their destinations; on any exception, `KeyboardInterrupt` included, they are
    removed and the exception propagates, leaving the destinations untouched.

    Args:
        paths: The output files.
        force: Replace outputs that already exist.
        inputs: Files the command reads; an output resolving to one of them is refused.

    Raises:
        UsageError: A destination folder is missing, an output is a directory, appears twice
            or is one of `inputs`.
        OutputExistsError: Outputs exist and `force` is false; all of them are listed.

    Example:
        >>> import tempfile
        >>> folder = tempfile.TemporaryDirectory()
        >>> a, b = Path(folder.name, "a.txt"), Path(folder.name, "b.txt")
        >>> with AtomicOutputs([a, b]) as outputs:
        ...     _ = outputs.temp(a).write_text("a")
        ...     _ = outputs.temp(b).write_text("b")
        >>> sorted(p.name for p in Path(folder.name).iterdir())
        ['a.txt', 'b.txt']
        >>> folder.cleanup()
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        force: bool = False,
        inputs: Sequence[str | Path] = (),
    ):
        self.paths = [Path(os.path.abspath(p)) for p in paths]
        self.force = force
        self._temps: dict[Path, Path] = {}
        self._state = "new"
        _check_outputs(self.paths, [Path(p) for p in inputs], force)

    def temp(self, path: str | Path) -> Path:
        """Returns the temporary file to write `path` to, creating it empty on the first call.

        The file is created with the permissions a new file gets under the process umask.

        Raises:
            ValueError: `path` is not one of the outputs, or this is not inside the `with` block.
        """
        final = Path(os.path.abspath(path))
        if final not in self.paths:
            raise ValueError(f"{str(path)!r} is not one of the declared outputs")
        if self._state != "open":
            raise ValueError(
                f"temporary files are given only inside the `with` block ({self._state})"
            )
        if final not in self._temps:
            self._temps[final] = _create_temp(final)
        return self._temps[final]

    def __enter__(self) -> AtomicOutputs:
        if self._state != "new":
            raise RuntimeError("AtomicOutputs can be entered only once")
        self._state = "open"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            self._commit()
        except BaseException:
            self._discard()
            raise

    def _commit(self) -> None:
        missing = [
            str(p) for p in self.paths if p not in self._temps or not self._temps[p].exists()
        ]
        if missing:
            raise RuntimeError(f"outputs were never written: {missing}")
        if not self.force:
            _refuse_existing(self.paths)
        for temp in self._temps.values():
            _fsync(temp)
        done: list[Path] = []
        try:
            for final in self.paths:
                existed = os.path.lexists(final)
                os.replace(self._temps[final], final)
                if not existed:
                    done.append(final)
        except BaseException:
            # Undo what can be undone; outputs replaced under `force` are already gone.
            for final in done:
                with contextlib.suppress(OSError):
                    os.unlink(final)
            raise
        self._state = "committed"
        for folder in dict.fromkeys(p.parent for p in self.paths):
            _fsync_dir(folder)

    def _discard(self) -> None:
        self._state = "discarded"
        for temp in self._temps.values():
            # Never mask the exception being handled: a temp that is already gone is fine.
            with contextlib.suppress(OSError):
                os.unlink(temp)


@contextlib.contextmanager
def atomic_path(
    path: str | Path, *, force: bool = False, inputs: Sequence[str | Path] = ()
) -> Iterator[Path]:
    """Yields a temporary path to write one output to; see `AtomicOutputs`.

    Example:
        >>> import tempfile
        >>> folder = tempfile.TemporaryDirectory()
        >>> out = Path(folder.name, "out.txt")
        >>> with atomic_path(out) as temp:
        ...     _ = temp.write_text("done")
        >>> out.read_text()
        'done'
        >>> folder.cleanup()
    """
    with AtomicOutputs([path], force=force, inputs=inputs) as outputs:
        yield outputs.temp(path)


def install_sigterm_handler() -> None:
    """Turns SIGTERM into `KeyboardInterrupt` so that cleanup code runs; main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")


def _check_outputs(paths: list[Path], inputs: list[Path], force: bool) -> None:
    for path in paths:
        if not path.parent.is_dir():
            raise UsageError(
                f"cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist",
                hint="Create the folder first, or choose another output path.",
            )
        if path.is_dir():
            raise UsageError(
                f"cannot write {str(path)!r}: it is a directory",
                hint="Give a file name for the output.",
            )
    real = [os.path.realpath(p) for p in paths]
    twice = sorted({str(p) for p, r in zip(paths, real, strict=True) if real.count(r) > 1})
    if twice:
        raise UsageError(
            f"the same output path is given more than once: {twice}",
            hint="Give each output its own path.",
        )
    for path, resolved in zip(paths, real, strict=True):
        for source in inputs:
            if resolved == os.path.realpath(source) or _same_file(path, source):
                raise UsageError(
                    f"output {str(path)!r} would overwrite the input {str(source)!r}",
                    hint="Write the output to another path; inputs are never modified.",
                )
    if not force:
        _refuse_existing(paths)


def _refuse_existing(paths: list[Path]) -> None:
    existing = [str(p) for p in paths if os.path.lexists(p)]
    if existing:
        listed = ", ".join(repr(p) for p in existing)
        raise OutputExistsError(
            f"output already exists: {listed}", hint="pass --force to overwrite"
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _create_temp(final: Path) -> Path:
    stem = final.name[:_MAX_STEM]
    while True:
        temp = final.with_name(f".{stem}.{secrets.token_hex(4)}.tmp")
        try:
            # Mode 0o666 lets the umask decide, as for any new file (mkstemp would force 0600).
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return temp


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:
        # Some file systems cannot sync a directory; the files themselves are synced.
        logger.debug("cannot fsync folder %s: %s", folder, error)
    finally:
        os.close(fd)
