"""Tests of bnnify.formats.zip_archive: archives examined before anything is inflated."""

from __future__ import annotations

import io
import struct
import zipfile

import pytest
import torch

from bnnify.errors import FormatError
from bnnify.formats import zip_archive
from bnnify.formats.zip_archive import check_inflation, check_stored, list_zip


def archive(tmp_path, members, compression=zipfile.ZIP_STORED, name="a.zip"):
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", compression) as out:
        for member, data in members:
            out.writestr(member, data)
    return path


def test_a_torch_save_archive_is_listed_as_torch_reads_it(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "m.pt")
    listing = list_zip(tmp_path / "m.pt")
    assert any(n.endswith("data.pkl") for n in listing.names())
    assert not any(m.compressed for m in listing.members) and listing.duplicates() == []
    check_stored(listing, "torch.save")
    check_inflation(listing)


def test_duplicates_are_listed(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as out, pytest.warns(UserWarning, match="Duplicate"):
        out.writestr("a", b"1")
        out.writestr("a", b"2")
    (tmp_path / "d.zip").write_bytes(buffer.getvalue())
    assert list_zip(tmp_path / "d.zip").duplicates() == ["a"]


def test_archives_other_readers_would_see_differently_are_refused(tmp_path):
    data = archive(tmp_path, [("x", b"data")]).read_bytes()
    cases = {
        "appended": data + b"junk",
        "commented": data[:-2] + struct.pack("<H", 4) + b"note",
        "prepended": b"junk" + data,
        "truncated": data[:-10],
        "empty": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(FormatError, match="truncated or corrupt zip archive"):
            list_zip(tmp_path / name)


def test_compressed_members_are_bounded_by_their_declared_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(zip_archive, "INFLATE_FLOOR", 1000)
    small = archive(tmp_path, [("x", bytes(900))], zipfile.ZIP_DEFLATED, "small.zip")
    check_inflation(list_zip(small))
    with pytest.raises(FormatError, match="is compressed"):
        check_stored(list_zip(small), "torch.save")
    with pytest.raises(FormatError, match="decompression bomb"):
        check_inflation(list_zip(small), declared=10**6)
    bomb = archive(tmp_path, [("x", bytes(200_000))], zipfile.ZIP_DEFLATED, "bomb.zip")
    with pytest.raises(FormatError, match=r"would inflate from .* to 200,000 bytes"):
        check_inflation(list_zip(bomb))


def test_a_stored_member_declaring_more_than_the_file_is_refused(tmp_path):
    data = bytearray(archive(tmp_path, [("x", b"data")]).read_bytes())
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<LL", data, central + 20, 10**6, 10**6)
    (tmp_path / "lie.zip").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="declares sizes that do not fit"):
        list_zip(tmp_path / "lie.zip")
