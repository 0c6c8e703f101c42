"""Tests of bnnify.formats.inputs: every file a command reads, so none is written onto."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bnnify.errors import UsageError
from bnnify.formats.inputs import file_identity, input_files, refuse_inputs


def index(folder: Path, name: str, shards: list[str]) -> Path:
    path = folder / name
    path.write_text(json.dumps({"weight_map": {f"t{i}": s for i, s in enumerate(shards)}}))
    return path


def test_a_file_is_itself_resolved(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"x")
    (tmp_path / "link.pt").symlink_to(tmp_path / "m.pt")
    assert input_files(tmp_path / "link.pt") == [tmp_path / "m.pt"]
    assert input_files(tmp_path / "missing.pt") == [tmp_path / "missing.pt"]


def test_a_folder_means_its_files_and_the_shards_its_indexes_name(tmp_path):
    (tmp_path / "model").mkdir()
    index(tmp_path / "model", "m.safetensors.index.json", ["a.safetensors", "sub/b.safetensors"])
    (tmp_path / "model" / "a.safetensors").write_bytes(b"")
    (tmp_path / "model" / "notes.txt").write_text("{ not json")
    found = {p.relative_to(tmp_path).as_posix() for p in input_files(tmp_path / "model")}
    assert found == {
        "model/m.safetensors.index.json",
        "model/a.safetensors",
        "model/sub/b.safetensors",  # missing, still an input's name
        "model/notes.txt",
    }


def test_an_index_of_any_name_adds_its_shards_resolved(tmp_path):
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(b"")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "s1.safetensors").symlink_to(elsewhere)
    path = index(tmp_path / "model", "weights.txt", ["s1.safetensors", "s1.safetensors"])
    assert input_files(path) == [path, elsewhere]


def test_a_fifo_is_never_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    assert input_files(tmp_path / "pipe") == [tmp_path / "pipe"]  # would hang if opened


@pytest.mark.parametrize("output", ["m.pt", "link.pt", "hard.pt", "./sub/../m.pt", "s1.bin"])
def test_outputs_onto_inputs_are_refused(tmp_path, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "m.pt").write_bytes(b"x")
    (tmp_path / "link.pt").symlink_to(tmp_path / "m.pt")
    os.link(tmp_path / "m.pt", tmp_path / "hard.pt")
    shards = index(tmp_path, "i.json", ["s1.bin"])
    with pytest.raises(UsageError, match="would overwrite the input") as error:
        refuse_inputs([tmp_path / "new", output], ["m.pt", shards])
    assert "even with --force" in error.value.hint
    refuse_inputs([tmp_path / "new", tmp_path / "sub" / "m.pt"], ["m.pt", shards])


def test_identity_follows_links_only_when_asked(tmp_path):
    (tmp_path / "a").write_bytes(b"")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert file_identity(tmp_path / "b", follow=True) == file_identity(tmp_path / "a")
    assert file_identity(tmp_path / "b") != file_identity(tmp_path / "a")
    assert file_identity(tmp_path / "missing") is None
