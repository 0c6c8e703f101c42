"""Tests of bnnify.formats.detect: format sniffing, hashing, and fuzzing of both."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from bnnify.errors import BnnifyError, FormatError
from bnnify.formats.detect import ModelFormat, describe, detect_format, sha256_file
from bnnify.formats.model_files import load_model
from bnnify.formats.safetensors_layout import MAX_HEADER_BYTES
from bnnify.formats.safetensors_reader import looks_like_safetensors

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def seeds(folder: Path) -> dict[str, bytes]:
    """Valid small files of each sniffed format, as bytes (shards written beside them)."""
    save_file({"a": torch.arange(4.0)}, str(folder / "s1.safetensors"))
    save_file({"b": torch.ones(2, dtype=torch.int8)}, str(folder / "s2.safetensors"))
    index = {
        "metadata": {"total_size": 18},
        "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"},
    }
    torch.save({"w": torch.ones(3)}, folder / "state.pt")
    return {
        "safetensors": (folder / "s1.safetensors").read_bytes(),
        "index": json.dumps(index).encode(),
        "state_dict": (folder / "state.pt").read_bytes(),
    }


def mutate(data: bytes, edits: list[tuple[int, int, str]]) -> bytes:
    data = bytearray(data)
    for position, value, kind in edits:
        index = position % (len(data) + 1)
        if kind == "set" and index < len(data):
            data[index] = value
        elif kind == "insert":
            data.insert(index, value)
        elif kind == "delete" and index < len(data):
            del data[index]
        elif kind == "cut":
            del data[index:]
    return bytes(data)


EDITS = st.lists(
    st.tuples(
        st.integers(0, 4000),
        st.integers(0, 255),
        st.sampled_from(["set", "set", "insert", "delete", "cut"]),
    ),
    min_size=1,
    max_size=4,
)


def check_detector(path: Path) -> None:
    """Detection says a format or raises a bnnify error; what it says, loading agrees with."""
    try:
        fmt = detect_format(path)
        digest = sha256_file(path)
    except BnnifyError:
        assert describe(path) is None
        return
    assert isinstance(fmt, ModelFormat) and len(digest) == 64
    assert describe(path) is not None
    if fmt in (ModelFormat.SAFETENSORS, ModelFormat.SHARDED):
        try:
            with load_model(path) as model:
                for name in model.names():
                    assert model.tensor(name).shape == model.meta(name).shape
        except BnnifyError:
            pass


@FUZZ
@given(data=st.binary(max_size=200))
def test_fuzz_detect_random_bytes(tmp_path: Path, data: bytes):
    path = tmp_path / "fuzz.bin"
    path.write_bytes(data)
    check_detector(path)


@FUZZ
@given(kind=st.sampled_from(["safetensors", "index", "state_dict"]), edits=EDITS)
def test_fuzz_detect_mutated_files(tmp_path: Path, kind: str, edits):
    path = tmp_path / "fuzz.bin"
    path.write_bytes(mutate(seeds(tmp_path)[kind], edits))
    check_detector(path)


@FUZZ
@given(
    weight_map=st.dictionaries(
        st.text(max_size=3),
        st.sampled_from(
            ["s1.safetensors", "s2.safetensors", "../s1.safetensors", "", "/x", "nul\0"]
        )
        | st.integers()
        | st.none(),
        max_size=3,
    ),
    metadata=st.none() | st.integers() | st.dictionaries(st.text(max_size=2), st.integers()),
)
def test_fuzz_structured_index_files(tmp_path: Path, weight_map, metadata):
    seeds(tmp_path)
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}))
    check_detector(index)
    check_detector(tmp_path)


def test_one_sniffer_and_one_limit_for_safetensors():
    header = (MAX_HEADER_BYTES).to_bytes(8, "little") + b"{"
    assert looks_like_safetensors(header, MAX_HEADER_BYTES + 8)
    assert not looks_like_safetensors(header, MAX_HEADER_BYTES + 7)  # past the file's end
    over = (MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{"
    assert not looks_like_safetensors(over, 2 * MAX_HEADER_BYTES)  # over the reader's limit


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"a.safetensors": "safe"}, "a safetensors file"),
        ({"a.pt": "state"}, "a torch.save file"),
        ({"a.pt": "text"}, None),
    ],
)
def test_describe_names_what_a_file_is(tmp_path: Path, files, expected):
    ((name, kind),) = files.items()
    path = tmp_path / name
    if kind == "safe":
        save_file({"w": torch.ones(1)}, str(path))
    elif kind == "state":
        torch.save({"w": torch.ones(1)}, path)
    else:
        path.write_text("hello")
    assert describe(path) == expected


def test_a_zip_with_data_appended_is_not_taken_for_a_model(tmp_path: Path):
    torch.save({"w": torch.ones(3)}, tmp_path / "state.pt")
    data = (tmp_path / "state.pt").read_bytes()
    (tmp_path / "appended.pt").write_bytes(data + b"trailing")
    with pytest.raises(FormatError, match="truncated or corrupt zip"):
        detect_format(tmp_path / "appended.pt")
    with zipfile.ZipFile(tmp_path / "prefixed.zip", "w") as archive:
        archive.writestr("archive/data.pkl", b"x")
    (tmp_path / "prefixed.pt").write_bytes(
        b"PK\x03\x04junk" + (tmp_path / "prefixed.zip").read_bytes()
    )
    with pytest.raises(FormatError, match="truncated or corrupt zip"):
        detect_format(tmp_path / "prefixed.pt")


def test_describe_a_folder_as_the_checkpoint_it_holds(tmp_path: Path):
    """As `detect_format` does (the fuzz test found `describe` saying None for a folder)."""
    save_file({"w": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    index = {"metadata": {}, "weight_map": {"w": "s1.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    assert detect_format(tmp_path) is ModelFormat.SHARDED
    assert describe(tmp_path) is not None
    assert describe(tmp_path / "missing") is None
    (tmp_path / "m.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"w": "../s1.safetensors"}})
    )
    assert describe(tmp_path / "m.safetensors.index.json") is None  # refused, not raised
