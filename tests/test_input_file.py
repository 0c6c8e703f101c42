"""Tests of bnnify.formats.input_file: only regular files are read."""

from __future__ import annotations

import os
import re
import signal
import socket

import pytest

from bnnify.errors import FormatError, InputError
from bnnify.formats.input_file import open_regular, regular_file


@pytest.fixture(autouse=True)
def _no_hang():
    def hung(*_):
        raise TimeoutError("blocked on a non-regular file")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_regular_files_and_links_to_them_pass(tmp_path):
    (tmp_path / "f").write_bytes(b"data")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    for path in (tmp_path / "f", tmp_path / "link"):
        assert regular_file(path) == path
        with open_regular(path) as stream:
            assert stream.read() == b"data"


def make_socket(path):
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    return server


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (os.mkfifo, "is a FIFO (named pipe), not a regular file"),
        (os.mkdir, "is a directory, not a regular file"),
        (make_socket, "is a socket, not a regular file"),
    ],
)
def test_other_files_are_refused_by_what_they_are(tmp_path, make, kind):
    target = make(tmp_path / "thing")
    (tmp_path / "link").symlink_to(tmp_path / "thing")
    for path in (tmp_path / "thing", tmp_path / "link"):
        for check in (regular_file, open_regular):
            with pytest.raises(InputError, match=re.escape(kind)) as error:
                check(path, "data file")
            assert not isinstance(error.value, FormatError)
            assert error.value.message.startswith(f"data file '{path}'")
    if isinstance(target, socket.socket):
        target.close()


def test_missing_files_and_dangling_links(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for check in (regular_file, open_regular):
        with pytest.raises(InputError, match=r"'.*missing' does not exist"):
            check(tmp_path / "missing")
        with pytest.raises(InputError, match="symbolic link to a missing file"):
            check(tmp_path / "dangling")
        with pytest.raises(InputError, match="cannot read"):
            check("nul\0byte")
