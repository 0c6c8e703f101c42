"""Zip archives examined before anything inflates them: one central directory, bounded sizes.

torch reads its archives (`torch.save`, TorchScript, torch.export) with its own zip reader
(miniz, inside `PyTorchFileReader`), not Python's `zipfile`. The two agree on an archive's
members when both find the same central directory: that is what `list_zip` makes sure of
(the end record is the file's last bytes, the directory ends where it begins, no data is
prepended), so that the members it lists, duplicates included, are those torch reads.
"""

from __future__ import annotations

import struct
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from bnnify.errors import FormatError, clip, shorten
from bnnify.formats.input_file import open_regular

__all__ = [
    "INFLATE_FLOOR",
    "INFLATE_RATIO",
    "ZipListing",
    "ZipMember",
    "check_inflation",
    "check_stored",
    "list_zip",
]

# What compressed members may inflate to in all: this many times the archive's size, and
# at least INFLATE_FLOOR. Deflate reaches ~1000:1 on zeros; real weights, code and data
# compress 1-20:1.
INFLATE_RATIO = 100
INFLATE_FLOOR = 64 << 20

_EOCD = struct.Struct("<4s4H2LH")
_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")


@dataclass(frozen=True)
class ZipMember:
    """One central-directory entry: its name, compression and declared sizes."""

    name: str
    compressed: bool
    compressed_size: int
    size: int
    offset: int


@dataclass(frozen=True)
class ZipListing:
    """The members of an archive, in central-directory order (duplicates kept)."""

    path: Path
    file_size: int
    members: list[ZipMember]

    def names(self) -> list[str]:
        return [member.name for member in self.members]

    def duplicates(self) -> list[str]:
        """Names that appear more than once (readers disagree on which copy they read)."""
        return sorted(name for name, count in Counter(self.names()).items() if count > 1)


def list_zip(path: str | Path, what: str = "zip archive", kind: str = "zip archive") -> ZipListing:
    """Lists an archive's members from its central directory, inflating nothing.

    Args:
        path: The archive.
        what: What the file is for, for messages about the file itself ("data file").
        kind: What the archive is, for messages about its content ("torch.export archive").

    Raises:
        InputError: The file is missing or not a regular file.
        FormatError: The file is not a zip archive, is truncated, or has data before its
            first member, after its end record, or a directory other readers would find
            elsewhere; also a stored member that does not fit in the file.
    """
    path = Path(path)
    try:
        with open_regular(path, what) as stream:
            size = stream.seek(0, 2)
            return ZipListing(path, size, _members(stream, size))
    except _Corrupt as problem:
        raise FormatError(
            f"'{path}' is a truncated or corrupt {kind}: {problem}",
            hint="Copy or download the file again.",
        ) from None


class _Corrupt(Exception):
    """What is wrong with an archive, worded by `list_zip`."""


def _members(stream: BinaryIO, size: int) -> list[ZipMember]:
    start, count = _directory(stream, size)
    stream.seek(0)
    try:
        with zipfile.ZipFile(stream) as archive:
            infos = archive.infolist()
            found = archive.start_dir
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise _Corrupt(clip(str(error))) from None
    if found != start or len(infos) != count:
        raise _Corrupt("its central directory is not where its end record says")
    members = [
        ZipMember(
            info.filename,
            info.compress_type != zipfile.ZIP_STORED,
            info.compress_size,
            info.file_size,
            info.header_offset,
        )
        for info in infos
    ]
    for member in members:
        stored_mismatch = not member.compressed and member.size != member.compressed_size
        if stored_mismatch or member.offset + member.compressed_size > start:
            raise _Corrupt(f"member {shorten(member.name)} declares sizes that do not fit the file")
    return members


def check_stored(listing: ZipListing, why: str) -> None:
    """Refuses an archive with a compressed member (its writer stores every member).

    Args:
        listing: The archive.
        why: Which writer made the archive, for the message ("torch.save").

    Raises:
        FormatError: A member is compressed.
    """
    packed = [m for m in listing.members if m.compressed]
    if packed:
        raise FormatError(
            f"'{listing.path}' is not as {why} writes it: member {shorten(packed[0].name)} is "
            f"compressed ({len(packed)} compressed member(s)), and {why} stores every member "
            "uncompressed",
            hint="The file was rewritten by another tool, or is hostile: save it again with "
            f"{why}.",
        )


def check_inflation(
    listing: ZipListing,
    declared: int | None = None,
    hint: str = "Save the file again without compression.",
) -> None:
    """Refuses an archive whose compressed members would inflate beyond the bound.

    The bound is `INFLATE_RATIO` times the archive's size, and at least `INFLATE_FLOOR`.

    Args:
        listing: The archive.
        declared: What the members' own headers say they inflate to, when known (the
            arrays of an .npz); the central directory's sizes otherwise.
        hint: How to fix the file.

    Raises:
        FormatError: A decompression bomb, or sizes that contradict each other.
    """
    total = sum(m.size for m in listing.members if m.compressed)
    limit = max(INFLATE_FLOOR, INFLATE_RATIO * listing.file_size)
    if total > limit or (declared is not None and declared > limit):
        inflated = max(total, declared or 0)
        raise FormatError(
            f"'{listing.path}' would inflate from {listing.file_size:,} to {inflated:,} bytes, "
            f"over the {limit:,} bytes bnnify accepts ({INFLATE_RATIO}x the file, at least "
            f"{INFLATE_FLOOR >> 20} MB): a decompression bomb or a corrupt archive",
            hint=hint,
        )


def _directory(stream: BinaryIO, size: int) -> tuple[int, int]:
    """The central directory's offset and entry count, from an end record at the very end."""
    if size < _EOCD.size:
        raise _Corrupt(f"it has {size} bytes, too few for a zip archive")
    stream.seek(size - _EOCD.size)
    signature, _, _, _, count, length, start, comment = _EOCD.unpack(stream.read(_EOCD.size))
    if signature != b"PK\x05\x06" or comment:
        raise _Corrupt("it does not end with a zip end record (truncated, or data appended)")
    end = size - _EOCD.size
    locator = size - _EOCD.size - _LOCATOR.size
    if locator >= 0:
        stream.seek(locator)
        mark, _, where, _ = _LOCATOR.unpack(stream.read(_LOCATOR.size))
        if mark == b"PK\x06\x07":
            stream.seek(where)
            record = stream.read(_EOCD64.size)
            if len(record) < _EOCD64.size or record[:4] != b"PK\x06\x06":
                raise _Corrupt("its zip64 end record is missing")
            *_, count, length, start = _EOCD64.unpack(record)
            end = where
    if start + length != end:
        raise _Corrupt("its central directory is not where its end record says")
    return start, count
