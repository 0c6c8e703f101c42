"""Tests of bnnify.formats.sharded: the one reader of sharded checkpoints' index files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from bnnify.errors import FormatError, InputError, UnsafeInputError
from bnnify.formats import sharded
from bnnify.formats.sharded import read_index


def make(folder, weight_map=None, **extra):
    folder.mkdir(exist_ok=True)
    for name in ("s1.safetensors", "s2.safetensors"):
        save_file({"t": torch.ones(1)}, str(folder / name))
    weight_map = weight_map or {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s1.safetensors"}
    index = folder / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map, **extra}))
    return index


def test_an_index_names_its_shards_once_each(tmp_path):
    index = read_index(make(tmp_path / "m", metadata={"total_size": 12}))
    assert index.metadata == {"total_size": 12}
    assert list(index.shards) == ["s1.safetensors", "s2.safetensors"]
    assert index.files == [
        (tmp_path / "m" / n).resolve() for n in ("s1.safetensors", "s2.safetensors")
    ]
    assert index.file_of("c") == index.file_of("a") != index.file_of("b")


@pytest.mark.parametrize(
    ("content", "error", "match"),
    [
        ("[]", FormatError, 'no non-empty "weight_map"'),
        ('{"weight_map": {}}', FormatError, "no non-empty"),
        ('{"weight_map": {"a": 3}}', FormatError, "names no shard file for 1 tensors"),
        ('{"weight_map": {"a": ""}}', FormatError, "names no shard file"),
        ('{"weight_map": {"a": "s1.safetensors"}, "metadata": []}', FormatError, "not an object"),
        ('{"weight_map": {"a": "x\\u0000y"}}', FormatError, "control characters"),
        ('{"weight_map": {"a": "missing.safetensors"}}', FormatError, "does not exist"),
        ('{"weight_map": {"a": "/etc/passwd"}}', UnsafeInputError, "outside its folder"),
        ('{"weight_map": {"a": "../s1.safetensors"}}', UnsafeInputError, "outside its folder"),
        ('{"weight_map": {"a": "s1.safetensors", "a": "s2.safetensors"}}', FormatError, "twice"),
        ('{"weight_map": ' + "[" * 5000 + "]" * 5000 + "}", FormatError, "nested deeper"),
    ],
)
def test_malformed_indexes_are_refused(tmp_path, content, error, match):
    index = make(tmp_path / "m")
    index.write_text(content)
    with pytest.raises(error, match=match) as caught:
        read_index(index)
    assert str(index) in caught.value.message


def test_links_are_followed_and_must_stay_in_the_indexs_folder(tmp_path):
    index = make(tmp_path / "m")
    save_file({"t": torch.ones(1)}, str(tmp_path / "outside.safetensors"))
    (tmp_path / "m" / "s2.safetensors").unlink()
    (tmp_path / "m" / "s2.safetensors").symlink_to("s1.safetensors")  # inside: fine
    assert (
        read_index(index).shards["s2.safetensors"] == (tmp_path / "m" / "s1.safetensors").resolve()
    )
    (tmp_path / "m" / "s2.safetensors").unlink()
    (tmp_path / "m" / "s2.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(UnsafeInputError, match=r"is a link to .*outside\.safetensors"):
        read_index(index)
    (tmp_path / "m" / "s2.safetensors").unlink()
    (tmp_path / "m" / "s2.safetensors").symlink_to("s2.safetensors")  # a loop
    with pytest.raises(FormatError, match="cannot be resolved"):
        read_index(index)


def test_a_linked_index_may_read_shards_beside_the_link_or_beside_its_target(tmp_path):
    real = make(tmp_path / "blobs")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "m.safetensors.index.json").symlink_to(real)
    (snapshot / "s1.safetensors").symlink_to(real.parent / "s1.safetensors")
    save_file({"t": torch.ones(1)}, str(snapshot / "s2.safetensors"))
    files = read_index(snapshot / "m.safetensors.index.json").files
    assert files == [
        real.parent.resolve() / "s1.safetensors",
        snapshot.resolve() / "s2.safetensors",
    ]


def test_non_regular_indexes_and_shards_and_the_size_limit(tmp_path, monkeypatch):
    index = make(tmp_path / "m")
    (tmp_path / "m" / "s2.safetensors").unlink()
    os.mkfifo(tmp_path / "m" / "s2.safetensors")
    with pytest.raises(InputError, match="is a FIFO"):
        read_index(index)
    with pytest.raises(InputError, match="is a directory"):
        read_index(tmp_path / "m")
    monkeypatch.setattr(sharded, "MAX_INDEX_BYTES", 10)
    with pytest.raises(FormatError, match="too large for an index file"):
        read_index(index)
