"""Output files that appear whole or not at all, never clobbering inputs or existing files.

How an output is committed (the guarantee):

- Every output is written to a temporary file in its destination folder, flushed to disk,
  then put in place; nothing is ever written through the final name.
- Without `force`, the final name is created exclusively: the finished temporary file
  is hard-linked to it (`link(2)` fails if the name exists), then its temporary name is
  removed. Of several processes committing the same outputs, exactly one succeeds; the
  others raise `OutputExistsError` and leave the winner's files untouched. Outputs
  committed together are placed in one fixed order (sorted paths), and when a later
  one is lost the earlier ones this run created are removed again.
- On file systems without hard links (FAT, exFAT, some SMB and FUSE mounts) the name
  is claimed by an exclusively created empty placeholder (`O_CREAT | O_EXCL`) that the
  finished file then replaces: still exclusive, but a reader can see the empty
  placeholder for that instant, and a `kill -9` at that instant leaves it behind.
- With `force`, `rename(2)` replaces an existing output atomically.
- Exclusive creation holds on local file systems and on NFS v3 and later.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from bnnify.errors import BnnifyError, OutputError, OutputExistsError, UsageError
from bnnify.formats.inputs import file_identity, refuse_inputs
from bnnify.formats.interrupts import deferred_signals, forget, raise_pending, track

__all__ = ["AtomicOutputs", "check_outputs"]

logger = logging.getLogger("bnnify")

# Temporary names keep their stem under this many bytes: room for the dot, the random
# part and the suffix within the usual 255-byte name limit.
_MAX_STEM = 200
# errno values of link(2) on a file system without hard links.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}
# errno values that only writing produces, reported as "cannot write" (exit 1): the
# reason and the hint.
_SPACE = "Free some space, or write to another folder; no output was left behind."
_WRITE_ERRORS = {
    errno.ENOSPC: ("no space left on device", _SPACE),
    errno.EDQUOT: ("disk quota exceeded", _SPACE),
    errno.EFBIG: (
        "file too large for this file system or for the file size limit (ulimit -f)",
        "Raise the limit, or write to a file system that takes large files "
        "(FAT32 stops at 4 GB); a sharded output (--shard-size) keeps each file smaller. "
        "No output was left behind.",
    ),
}
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


class AtomicOutputs:
    """Writes several output files through temporary files, committed together.

    Every check that can fail is done on construction, before any work, so a command fails
    fast: see `check_outputs`. Inside the `with` block, write each output to `temp(path)`,
    a hidden file in the destination folder. On normal exit the temporary files are
    flushed to disk and committed (see the module's docstring for the guarantee); on any
    exception, `KeyboardInterrupt` included, they are removed and the exception
    propagates, leaving the destinations untouched. A disk that fills up or a file that
    grows too large while writing becomes an `OutputError` naming the output.

    Args:
        paths: The output files.
        force: Replace outputs that already exist.
        inputs: Files and folders the command reads; see `check_outputs`.

    Raises:
        UsageError: See `check_outputs`.
        OutputExistsError: Outputs exist and `force` is false; all of them are listed.
        OutputError: The destination folder cannot take a new file (no space left).

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
        self._latest: Path | None = None
        self._state = "new"
        check_outputs(self.paths, force=force, inputs=inputs)

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
        self._latest = final
        if final not in self._temps:
            with deferred_signals():
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
        if exc is not None:
            self._discard()
            self._reraise_write_error(exc)
            return
        try:
            self._commit()
        except BaseException as error:
            self._discard()
            self._reraise_write_error(error)
            raise

    def _reraise_write_error(self, error: BaseException) -> None:
        if isinstance(error, OSError) and error.errno in _WRITE_ERRORS:
            final = self._latest or self.paths[0]
            raise _write_error(final, error) from None

    def _commit(self) -> None:
        missing = [
            str(p) for p in self.paths if p not in self._temps or not self._temps[p].exists()
        ]
        if missing:
            raise RuntimeError(f"outputs were never written: {missing}")
        with deferred_signals():
            if not self.force:
                _refuse_existing(self.paths)
            for final, temp in self._temps.items():
                self._latest = final
                _fsync(temp)
            placed: list[tuple[Path, tuple[int, int] | None]] = []
            try:
                # One order for every process, so that of several runs racing for the
                # same outputs the first to claim the first name completes.
                for final in sorted(self.paths, key=str):
                    raise_pending()
                    placed += self._place(final)
                for folder in dict.fromkeys(p.parent for p in self.paths):
                    _fsync_dir(folder)
                raise_pending()
            except BaseException:
                for final, identity in reversed(placed):
                    _remove_if_ours(final, identity)
                raise
            self._state = "committed"

    def _place(self, final: Path) -> list[tuple[Path, tuple[int, int] | None]]:
        """Puts one finished temporary file in place; returns what to undo on failure."""
        temp, self._latest = self._temps[final], final
        identity = file_identity(temp)
        if self.force:
            existed = os.path.lexists(final)
            os.replace(temp, final)
            forget(temp)
            # An output replaced under `force` is gone: only new ones can be undone.
            return [] if existed else [(final, identity)]
        _claim(temp, final)
        return [(final, identity)]

    def _discard(self) -> None:
        self._state = "discarded"
        with deferred_signals():
            for temp in self._temps.values():
                # Never mask the exception being handled: a temp that is already gone is fine.
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                forget(temp)


def check_outputs(
    paths: Sequence[str | Path], *, force: bool = False, inputs: Sequence[str | Path] = ()
) -> None:
    """Refuses outputs that cannot or must not be written, before any work is done.

    An output is refused when its folder is missing or not writable, its name is too long
    for the file system, it is a directory, it appears twice, or it is one of the files
    the command reads, `force` or not: `inputs` are expanded by `input_files` (a folder
    means its files, a sharded index its shards) and compared by resolved path and by
    inode, so symbolic and hard links to an input count as the input.

    Raises:
        UsageError: For the reasons above (exit code 2), or a file is named "-" (stdout).
        OutputExistsError: Outputs exist and `force` is false; all of them are listed.
        OutputError: The folder cannot take a new file (no space left).
    """
    paths = [Path(os.path.abspath(p)) for p in paths]
    for path in paths:
        _check_destination(path)
    real = [os.path.realpath(p) for p in paths]
    twice = sorted({str(p) for p, r in zip(paths, real, strict=True) if real.count(r) > 1})
    if twice:
        raise UsageError(
            f"the same output path is given more than once: {twice}",
            hint="Give each output its own path.",
        )
    refuse_inputs(paths, inputs)
    if not force:
        _refuse_existing(paths)
    for path in paths:
        _probe(path)


def _check_destination(path: Path) -> None:
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(
            f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist",
            hint="Create the folder first, or choose another output path.",
        )
    limit = _name_max(folder)
    size = len(os.fsencode(path.name))
    if size > limit:
        raise UsageError(
            f"cannot write {_short(path)!r}: its name is {size} bytes long, more than the "
            f"{limit} this file system allows",
            hint="Choose a shorter output file name.",
        )
    if path.is_dir() or path.name == "-":
        what = "a directory" if path.is_dir() else "stdout ('-' is a stream for predict -o only)"
        raise UsageError(
            f"cannot write {str(path)!r}: it is {what}", hint="Give a file name for the output."
        )


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _short(path: Path, keep: int = 80) -> str:
    text = str(path)
    return text if len(text) <= keep else f"{text[: keep // 2]}...{text[-keep // 2 :]}"


def _probe(path: Path) -> None:
    """Creates and removes a temporary file where `path` will be written."""
    with deferred_signals():
        temp = _create_temp(path)
        os.unlink(temp)
        forget(temp)


def _refuse_existing(paths: list[Path]) -> None:
    existing = [str(p) for p in paths if os.path.lexists(p)]
    if existing:
        listed = ", ".join(repr(p) for p in existing)
        raise OutputExistsError(
            f"output already exists: {listed}", hint="pass --force to overwrite"
        )


def _create_temp(final: Path) -> Path:
    """Creates an empty hidden file beside `final`; call inside `deferred_signals()`."""
    stem = final.name
    while len(os.fsencode(stem)) > _MAX_STEM:
        stem = stem[:-1]
    while True:
        temp = final.with_name(f".{stem}.{secrets.token_hex(4)}.tmp")
        try:
            # Mode 0o666 lets the umask decide, as for any new file (mkstemp would force 0600).
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as error:
            raise _creation_error(final, error) from None
        track(temp)
        os.close(fd)
        return temp


def _claim(temp: Path, final: Path) -> None:
    """Gives the finished `temp` the name `final`, which must not exist; see the module."""
    try:
        os.link(temp, final, follow_symlinks=False)
    except FileExistsError:
        raise _lost(final) from None
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS:
            raise
        _claim_by_placeholder(temp, final)
        return
    os.unlink(temp)
    forget(temp)


def _claim_by_placeholder(temp: Path, final: Path) -> None:
    try:
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise _lost(final) from None
    os.close(fd)
    try:
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(final)
        raise
    forget(temp)


def _remove_if_ours(final: Path, identity: tuple[int, int] | None) -> None:
    """Undoes a commit step, unless another process has put its own file there since."""
    if identity is not None and file_identity(final) == identity:
        with contextlib.suppress(OSError):
            os.unlink(final)


def _lost(final: Path) -> OutputExistsError:
    return OutputExistsError(
        f"output already exists: {str(final)!r} was created by another process meanwhile",
        hint="Nothing was replaced. Pass --force to overwrite it, or choose another path.",
    )


def _creation_error(final: Path, error: OSError) -> BnnifyError:
    reason = error.strerror or str(error)
    if error.errno in _UNWRITABLE:
        return UsageError(
            f"cannot write {str(final)!r}: folder {str(final.parent)!r} is not writable ({reason})",
            hint="Choose another output folder, or make this one writable.",
        )
    if error.errno == errno.ENAMETOOLONG:
        return UsageError(
            f"cannot write {_short(final)!r}: the path is too long ({reason})",
            hint="Choose a shorter output path.",
        )
    return _write_error(final, error)


def _write_error(final: Path, error: OSError) -> OutputError:
    reason, hint = _WRITE_ERRORS.get(error.errno or 0, (error.strerror or str(error), None))
    return OutputError(f"cannot write {str(final)!r}: {reason}", hint=hint)


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
