"""The files a command reads, so that no output is ever written onto one of them."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from bnnify.errors import BnnifyError, UsageError
from bnnify.formats.sharded import MAX_INDEX_BYTES, read_weight_map

__all__ = ["file_identity", "input_files", "refuse_inputs"]


def input_files(path: str | Path) -> list[Path]:
    """Every file that reading `path` may open, resolved (symbolic links followed).

    A file is listed itself, a folder by every entry in it. An index of a sharded
    checkpoint (a JSON file with a `weight_map`, whatever its name, as the model reader
    recognises it), given or found in a given folder, adds the shard files it names.
    Missing files are listed too: nothing may be created where an input is expected.

    Example:
        >>> import tempfile
        >>> folder = tempfile.TemporaryDirectory()
        >>> _ = Path(folder.name, "m.safetensors.index.json").write_text(
        ...     '{"weight_map": {"w": "m-1.safetensors"}}')
        >>> sorted(p.name for p in input_files(folder.name))
        ['m-1.safetensors', 'm.safetensors.index.json']
        >>> folder.cleanup()
    """
    root = Path(os.path.realpath(path))
    files = [Path(os.path.realpath(entry.path)) for entry in _entries(root)] or [root]
    for file in list(files):
        files += [Path(os.path.realpath(file.parent / shard)) for shard in _shards(file)]
    return list(dict.fromkeys(files))


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:  # not a folder (or not readable: the command will say so)
        return []


def _shards(file: Path) -> list[str]:
    """The shard names of an index file; nothing for any other file."""
    try:
        info = os.stat(file)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_INDEX_BYTES:
            return []  # a FIFO is never opened here; other readers refuse it
        with open(file, "rb") as stream:
            if not stream.read(64).lstrip().startswith(b"{"):
                return []
        return sorted(set(_weight_map(file).values()))
    except (OSError, BnnifyError):
        return []


def _weight_map(index: Path) -> dict[str, str]:
    """The tensor -> shard map of an index file, read by the model reader's own parser."""
    return read_weight_map(index)


def refuse_inputs(outputs: Sequence[str | Path], inputs: Sequence[str | Path]) -> None:
    """Refuses any output that is one of the files `inputs` read (see `input_files`).

    Compared by resolved path and by inode, so that a symbolic or a hard link to an input
    counts as the input.

    Raises:
        UsageError: Naming the output and the input.
    """
    by_path: dict[str, tuple[str, Path]] = {}
    by_inode: dict[tuple[int, int], tuple[str, Path]] = {}
    for given in inputs:
        for file in input_files(given):
            by_path.setdefault(str(file), (str(given), file))
            identity = file_identity(file, follow=True)
            if identity is not None:
                by_inode.setdefault(identity, (str(given), file))
    for path in outputs:
        found = by_path.get(os.path.realpath(path))
        identity = file_identity(path, follow=True)
        if found is None and identity is not None:
            found = by_inode.get(identity)
        if found is None:
            continue
        given, file = found
        part = "" if file == Path(os.path.realpath(given)) else f" (its file {str(file)!r})"
        raise UsageError(
            f"output {str(path)!r} would overwrite the input {given!r}{part}",
            hint="Write the output to another path: inputs are never modified, even with --force.",
        )


def file_identity(path: str | Path, *, follow: bool = False) -> tuple[int, int] | None:
    """`(st_dev, st_ino)` of `path` (of the link itself unless `follow`), None if missing."""
    try:
        info = os.stat(path) if follow else os.lstat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino
