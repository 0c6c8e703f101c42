"""Tests of the streaming safetensors writer, the strict header reader and the sharded writer."""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnnify.errors import ArgumentTypeError, FormatError, InputError, InvalidArgumentError
from bnnify.formats.atomic import AtomicOutputs
from bnnify.formats.safetensors_io import (
    SafetensorsWriter,
    ShardedWriter,
    TensorInfo,
    is_safetensors,
    load_file,
    plan_order,
    read_header,
    save_file,
)
from bnnify.formats.safetensors_layout import CODES, MAX_HEADER_BYTES

DTYPES = list(CODES)
SHAPES = [(), (0,), (3, 0), (7,), (2, 3, 4)]
FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Random bit patterns (NaNs and infinities included), valid booleans for `bool`."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, dtype=torch.uint8).bool()
    count = torch.Size(shape).numel() * dtype.itemsize
    return torch.randint(0, 256, (count,), dtype=torch.uint8).view(dtype).reshape(shape)


def raw(tensor: torch.Tensor) -> bytes:
    """The bytes of a tensor, to compare bit for bit (NaN != NaN otherwise)."""
    flat = tensor.contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).tolist()) if flat.numel() else b""


def mixed_tensors() -> dict[str, torch.Tensor]:
    tensors = {
        f"t{i}.{dtype}".replace("torch.", ""): random_tensor(dtype, (3, 2))
        for i, dtype in enumerate(DTYPES)
    }
    tensors.update(
        {
            "z.scalar": random_tensor(torch.float32, ()),
            "a.empty": random_tensor(torch.float32, (0, 4)),
            "a.long": random_tensor(torch.float32, (5,)),
            "ünïcode/名前": random_tensor(torch.bfloat16, (2,)),
        }
    )
    return tensors


def header_of(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_exact(tmp_path: Path, dtype: torch.dtype, shape: tuple[int, ...]):
    tensor = random_tensor(dtype, shape)
    path = tmp_path / "t.safetensors"
    save_file({"x": tensor}, path, {"format": "pt"})
    for loaded in (load_file(path)["x"], safetensors.torch.load_file(path)["x"]):
        assert loaded.dtype == dtype
        assert loaded.shape == tensor.shape
        assert raw(loaded) == raw(tensor)
    with safetensors.safe_open(path, framework="pt") as file:
        assert file.metadata() == {"format": "pt"}
    assert read_header(path) == ({"format": "pt"}, {"x": TensorInfo("x", dtype, shape)})


@pytest.mark.parametrize(
    "metadata", [None, {}, {"format": "pt"}, {"k": 'q"\\\n\t\x01\x7f é \u2028 😀'}]
)
def test_bytes_match_the_official_writer(tmp_path: Path, metadata):
    tensors = mixed_tensors()
    path = tmp_path / "ours.safetensors"
    save_file(tensors, path, metadata)
    assert path.read_bytes() == safetensors.torch.save(tensors, metadata=metadata)


def test_several_metadata_keys_match_the_official_writer_but_for_key_order(tmp_path: Path):
    # The official writer emits metadata in Rust HashMap order, which changes between runs;
    # ours sorts the keys. Everything else is identical.
    tensors = mixed_tensors()
    metadata = {f"key{i}": f"value {i}" for i in range(6)}
    save_file(tensors, tmp_path / "ours.safetensors", metadata)
    ours = (tmp_path / "ours.safetensors").read_bytes()
    official = safetensors.torch.save(tensors, metadata=metadata)
    assert len(ours) == len(official)
    (our_header, our_data), (their_header, their_data) = header_of(ours), header_of(official)
    assert our_data == their_data
    assert our_header == their_header
    assert list(our_header["__metadata__"]) == sorted(metadata)


def test_plan_order_sorts_by_descending_dtype_then_name():
    infos = [
        TensorInfo(n, d, (1,))
        for n, d in [("b", torch.int8), ("a", torch.int8), ("c", torch.float64), ("d", torch.bool)]
    ]
    assert [i.name for i in plan_order(infos)] == ["c", "a", "b", "d"]


def test_writer_streams_views_and_parameters():
    base = torch.randn(4, 6)
    tensors = {
        "transposed": base.t(),
        "expanded": torch.randn(3, 1).expand(3, 5),
        "sliced": base[1:, ::2],
        "half_transposed": torch.randn(3, 2).half().t(),
        "parameter": torch.nn.Parameter(torch.randn(2, 2)),
        "bool_slice": torch.rand(6) > 0.5,
    }
    buffer = io.BytesIO()
    writer = SafetensorsWriter(buffer, [TensorInfo.of(n, t) for n, t in tensors.items()])
    for name in writer.order:
        writer.write(name, tensors[name])
    writer.finish()
    loaded = safetensors.torch.load(buffer.getvalue())
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor.detach())


def test_writer_refuses_misuse():
    infos = [TensorInfo("a", torch.float32, (2,)), TensorInfo("b", torch.float32, (2,))]
    writer = SafetensorsWriter(io.BytesIO(), infos)
    assert writer.order == ["a", "b"]
    with pytest.raises(RuntimeError, match="out of order"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(RuntimeError, match="declared"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(RuntimeError, match="declared"):
        writer.write("a", torch.zeros(2, dtype=torch.float64))
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"never written.*'b'"):
        writer.finish()
    writer.write("b", torch.zeros(2))
    with pytest.raises(RuntimeError, match="all 2 tensors"):
        writer.write("c", torch.zeros(2))
    writer.finish()


@pytest.mark.parametrize(
    ("infos", "metadata", "error", "match"),
    [
        (
            [TensorInfo("a", torch.float32, ()), TensorInfo("a", torch.int8, ())],
            None,
            InvalidArgumentError,
            "more than once",
        ),
        ([TensorInfo("", torch.float32, ())], None, InvalidArgumentError, "empty or reserved"),
        ([TensorInfo("__metadata__", torch.float32, ())], None, InvalidArgumentError, "reserved"),
        ([TensorInfo(3, torch.float32, ())], None, ArgumentTypeError, "must be a string"),
        ([TensorInfo("c", torch.complex64, (2,))], None, FormatError, "complex64"),
        ([TensorInfo("c", torch.complex128, (2,))], None, FormatError, "Supported dtypes"),
        ([], {"k": 1}, TypeError, "must be a string"),
        ([], {"": "v"}, InvalidArgumentError, "empty"),
        ([], {"k": "\ud800"}, InvalidArgumentError, "Unicode"),
    ],
)
def test_writer_refuses_bad_declarations(infos, metadata, error, match):
    with pytest.raises(error, match=match):
        SafetensorsWriter(io.BytesIO(), infos, metadata)


def test_writer_refuses_sparse_tensors():
    sparse = torch.eye(3).to_sparse()
    writer = SafetensorsWriter(io.BytesIO(), [TensorInfo.of("s", sparse)])
    with pytest.raises(FormatError, match="to_dense"):
        writer.write("s", sparse)


def valid_file(tmp_path: Path) -> Path:
    path = tmp_path / "valid.safetensors"
    save_file({"w": torch.randn(2, 3), "b": torch.zeros(3, dtype=torch.float16)}, path, {"k": "v"})
    return path


def with_header(header: dict | str | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header) if length is None else length) + header + data


ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
# The official reader's wording, but for the checks bnnify adds (repeated keys, dtypes torch
# cannot hold, the length prefix read to sniff the file).
MALFORMED = {
    "empty file": (b"", "too few"),
    "short prefix": (b"\x01\x00", "too few"),
    "length past the end": (with_header("{}", length=100), "exceeds the file size"),
    "length over the limit": (with_header("{}", length=MAX_HEADER_BYTES + 1), "reader's limit"),
    "not utf-8": (with_header(b"{\xff}"), "invalid"),
    "not an object": (with_header("[1, 2]"), "does not start with"),
    "invalid json": (with_header("{'a': 1}"), "invalid JSON"),
    "nan": (with_header('{"__metadata__": {"a": NaN}}'), "invalid JSON"),
    "repeated tensor": (
        with_header(f'{{"a": {json.dumps(ENTRY)}, "a": {json.dumps(ENTRY)}}}', bytes(8)),
        "'a' appears twice",
    ),
    "repeated metadata key": (
        with_header('{"__metadata__": {"k": "x", "k": "y"}}'),
        "'k' appears twice",
    ),
    "deep nesting": (with_header("{" + '"a":[' * 100_000), "invalid JSON"),
    "lone surrogate": (with_header({"\ud800": ENTRY}, bytes(8)), "invalid JSON"),
    "metadata not strings": (with_header({"__metadata__": {"a": 1}}), "expected a string"),
    "metadata a list": (with_header({"__metadata__": ["a"]}), "expected a map"),
    "unknown dtype": (with_header({"a": {**ENTRY, "dtype": "F128"}}, bytes(8)), "F128"),
    "complex dtype": (with_header({"a": {**ENTRY, "dtype": "C64"}}, bytes(8)), "invalid"),
    "packed dtype": (
        with_header({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, bytes(1)),
        "dtype 'F4', which bnnify cannot read",
    ),
    "missing key": (with_header({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "missing"),
    "entry not an object": (with_header({"a": 3}), "invalid type"),
    "negative size": (with_header({"a": {**ENTRY, "shape": [-2]}}, bytes(8)), "usize"),
    "float size": (with_header({"a": {**ENTRY, "shape": [2.0]}}, bytes(8)), "usize"),
    "boolean size": (with_header({"a": {**ENTRY, "shape": [True, 2]}}, bytes(8)), "usize"),
    "one offset": (with_header({"a": {**ENTRY, "data_offsets": [0]}}, bytes(8)), "size 2"),
    "size mismatch": (with_header({"a": {**ENTRY, "shape": [3]}}, bytes(8)), "invalid shape"),
    "reversed offsets": (
        with_header({"a": {**ENTRY, "data_offsets": [8, 0]}}, bytes(8)),
        "invalid offset",
    ),
    "huge shape": (with_header({"a": {**ENTRY, "shape": [2**62] * 40}}, bytes(8)), "overflow"),
    "beyond the file": (with_header({"a": ENTRY}, bytes(4)), "not fully covered"),
    "trailing bytes": (with_header({"a": ENTRY}, bytes(12)), "not fully covered"),
    "hole": (with_header({"a": {**ENTRY, "data_offsets": [4, 12]}}, bytes(12)), "offset"),
    "overlap": (
        with_header({"a": ENTRY, "b": {**ENTRY, "data_offsets": [4, 12]}}, bytes(12)),
        "offset",
    ),
}


@pytest.mark.parametrize(("content", "match"), MALFORMED.values(), ids=MALFORMED.keys())
def test_read_header_refuses_malformed_files(tmp_path: Path, content: bytes, match: str):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=match) as info:
        read_header(path)
    assert str(path) in str(info.value)
    assert info.value.hint


def test_read_header_accepts_zero_sized_tensors_anywhere(tmp_path: Path):
    path = tmp_path / "f.safetensors"
    header = {
        "b": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
        "a": ENTRY,
        "c": {"dtype": "F32", "shape": [3, 0], "data_offsets": [0, 0]},
    }
    path.write_bytes(with_header(header, bytes(8)))
    metadata, infos = read_header(path)
    assert metadata == {}
    assert list(infos) == ["c", "a", "b"]
    assert load_file(path)["b"].shape == (0,)


def test_unreadable_files_are_input_errors(tmp_path: Path):
    cases = {tmp_path / "missing.safetensors": "does not exist", tmp_path: "is a directory"}
    for path, match in cases.items():
        with pytest.raises(InputError, match=match) as info:
            read_header(path)
        assert not isinstance(info.value, FormatError)


def test_is_safetensors_sniffs_content(tmp_path: Path):
    assert is_safetensors(valid_file(tmp_path))
    pickle = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickle)
    text = tmp_path / "spec.yaml"
    text.write_text("posterior: gaussian\n" * 10)
    short = tmp_path / "short"
    short.write_bytes(b"\x02\x00\x00")
    for path in (pickle, text, short, tmp_path, tmp_path / "missing"):
        assert not is_safetensors(path)


def test_load_file_selects_names_and_suggests_close_ones(tmp_path: Path):
    path = valid_file(tmp_path)
    assert list(load_file(path, names=["w"])) == ["w"]
    with pytest.raises(InputError, match="Did you mean 'w'") as info:
        load_file(path, names=["ww"])
    assert "2 tensors" in info.value.hint


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes(tmp_path: Path, data: bytes):
    check_parser(tmp_path, data)


EDITS = st.lists(
    st.tuples(
        st.integers(0, 10_000),
        st.integers(0, 255),
        st.sampled_from(["set", "set", "set", "insert", "delete", "cut"]),
    ),
    min_size=1,
    max_size=3,
)


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


@FUZZ
@given(edits=EDITS)
def test_fuzz_mutated_valid_file(tmp_path: Path, edits):
    check_parser(tmp_path, mutate(valid_file(tmp_path).read_bytes(), edits))


@FUZZ
@given(edits=EDITS, alphabet=st.sampled_from(b'0123456789-[]{},:" eE.'), keep_length=st.booleans())
def test_fuzz_mutated_valid_header(tmp_path: Path, edits, alphabet: int, keep_length: bool):
    """Edits the JSON text of a valid header, mostly with JSON characters."""
    data = valid_file(tmp_path).read_bytes()
    length = int.from_bytes(data[:8], "little")
    edits = [(p, alphabet if v % 2 else v, k) for p, v, k in edits]
    header = mutate(data[8 : 8 + length].rstrip(b" "), edits)
    header += b" " * (-len(header) % 8)
    prefix = data[:8] if keep_length else len(header).to_bytes(8, "little")
    check_parser(tmp_path, prefix + header + data[8 + length :])


CODES_OR_NOT = st.sampled_from(["F32", "I8", "BOOL", "BF16", "F8_E4M3", "U64", "C64", "f32"])
TENSORS = st.lists(
    st.tuples(st.text(max_size=3), CODES_OR_NOT, st.lists(st.integers(0, 3), max_size=3)),
    max_size=4,
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**64) | st.floats() | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@FUZZ
@given(
    tensors=TENSORS,
    metadata=st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4)) | JSON,
    spoil=st.tuples(st.integers(0, 7), st.sampled_from(sorted(ENTRY)), JSON),
    extra=st.sampled_from([0, 0, 1, -1, 8]),
)
def test_fuzz_structured_headers(tmp_path: Path, tensors, metadata, spoil, extra: int):
    """Headers with consistent offsets, some spoiled in one place."""
    header: dict = {"__metadata__": metadata} if metadata is not None else {}
    offset = 0
    for name, code, shape in tensors:
        size = math.prod(shape) * {"BOOL": 1, "I8": 1, "F8_E4M3": 1, "BF16": 2, "U64": 8}.get(
            code, 4
        )
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    index, key, value = spoil
    if index < len(tensors) and index < 4:
        header[tensors[index][0]][key] = value
    check_parser(tmp_path, with_header(json.dumps(header), bytes(max(offset + extra, 0))))


def check_parser(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        metadata, infos = read_header(path)
    except FormatError:
        return
    assert is_safetensors(path)
    assert all(isinstance(v, str) for v in metadata.values())
    assert sum(info.nbytes for info in infos.values()) <= len(data)
    tensors = load_file(path)
    assert {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()} == {
        name: (info.dtype, info.shape) for name, info in infos.items()
    }


def shard_tensors() -> dict[str, torch.Tensor]:
    return {
        "big": torch.randn(64),  # 256 bytes, more than a shard
        "layer.0.weight": torch.randn(10),
        "layer.0.bias": torch.randn(5),
        "layer.1.weight": torch.randn(10).half(),
        "steps": torch.tensor(7),
        "mask": torch.ones(3, dtype=torch.bool),
        "empty": torch.zeros(0),
    }


def write_sharded(directory: Path, tensors, metadata, max_bytes, **kwargs) -> ShardedWriter:
    infos = [TensorInfo.of(n, t) for n, t in tensors.items()]
    writer = ShardedWriter(directory, "model", infos, metadata, max_bytes, **kwargs)
    for name in writer.order:
        writer.write(name, tensors[name])
    writer.finish()
    return writer


def load_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    index = json.loads(index_path.read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(safetensors.torch.load_file(index_path.parent / shard))
    assert set(tensors) == set(index["weight_map"])
    return tensors


def test_sharded_round_trip(tmp_path: Path):
    tensors = shard_tensors()
    writer = write_sharded(tmp_path, tensors, {"format": "pt"}, max_bytes=48)
    paths = writer.paths()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    count = len(paths) - 1
    assert [p.name for p in paths[:-1]] == [
        f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)
    ]
    loaded = load_sharded(writer.index_path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert raw(loaded[name]) == raw(tensor) and loaded[name].dtype == tensor.dtype
    index_text = writer.index_path.read_text()
    index = json.loads(index_text)
    assert index_text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert index["metadata"] == {
        "format": "pt",
        "total_size": str(sum(raw(t).__len__() for t in tensors.values())),
    }
    for shard in paths[:-1]:
        metadata, infos = read_header(shard)
        assert metadata == {"format": "pt"}
        size = sum(info.nbytes for info in infos.values())
        assert size <= 48 or len(infos) == 1
        assert all(index["weight_map"][name] == shard.name for name in infos)
    stored = [name for shard in paths[:-1] for name in read_header(shard)[1]]
    assert stored == writer.order


def test_sharded_output_is_deterministic(tmp_path: Path):
    tensors = shard_tensors()
    first, second = tmp_path / "1", tmp_path / "2"
    first.mkdir(), second.mkdir()
    write_sharded(first, tensors, {"b": "2", "a": "1"}, 48)
    write_sharded(second, dict(reversed(tensors.items())), {"a": "1", "b": "2"}, 48)
    for path in first.iterdir():
        assert path.read_bytes() == (second / path.name).read_bytes()


def test_sharded_writer_completes_shards_incrementally(tmp_path: Path):
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(4)}
    infos = [TensorInfo.of(n, t) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, "model", infos, None, max_shard_bytes=32)
    first = writer.paths()[0]
    assert not first.exists()
    for name in writer.order[:-1]:
        writer.write(name, tensors[name])
    # The last tensor is not written yet: the first shard is already complete on disk.
    assert list(load_file(first)) == writer.order[:2]
    writer.write(writer.order[-1], tensors[writer.order[-1]])
    writer.finish()
    assert len(load_sharded(writer.index_path)) == 4


def test_sharded_writer_with_atomic_outputs(tmp_path: Path):
    tensors = shard_tensors()
    infos = [TensorInfo.of(n, t) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, "model", infos, None, 64)
    with pytest.raises(KeyboardInterrupt), AtomicOutputs(writer.paths()) as outputs, writer:
        writer.temp_path = outputs.temp
        for name in writer.order[:3]:
            writer.write(name, tensors[name])
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    writer = ShardedWriter(tmp_path, "model", infos, None, 64)
    with AtomicOutputs(writer.paths()) as outputs:
        writer.temp_path = {path: outputs.temp(path) for path in writer.paths()}
        for name in writer.order:
            writer.write(name, tensors[name])
        writer.finish()
    assert sorted(tmp_path.iterdir()) == sorted(writer.paths())
    assert set(load_sharded(writer.index_path)) == set(tensors)


def test_sharded_writer_without_tensors_writes_one_empty_shard(tmp_path: Path):
    writer = write_sharded(tmp_path, {}, None, 10)
    assert [p.name for p in writer.paths()] == [
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]
    assert read_header(writer.paths()[0]) == ({}, {})
    assert json.loads(writer.index_path.read_text()) == {
        "metadata": {"total_size": "0"},
        "weight_map": {},
    }


@pytest.mark.parametrize(
    ("stem", "metadata", "max_bytes", "match"),
    [
        ("model", None, 0, "max_shard_bytes"),
        ("a/b", None, 10, "stem"),
        ("", None, 10, "stem"),
        ("model", {"total_size": "1"}, 10, "reserved"),
    ],
)
def test_sharded_writer_refuses_bad_arguments(tmp_path: Path, stem, metadata, max_bytes, match):
    with pytest.raises(InvalidArgumentError, match=match):
        ShardedWriter(tmp_path, stem, [], metadata, max_bytes)


def test_sharded_writer_refuses_misuse(tmp_path: Path):
    tensors = {"a": torch.zeros(2), "b": torch.zeros(2)}
    infos = [TensorInfo.of(n, t) for n, t in tensors.items()]
    with ShardedWriter(tmp_path, "model", infos, None, 8) as writer:
        writer.write("a", tensors["a"])
        with pytest.raises(RuntimeError, match="never written"):
            writer.finish()
    assert not writer.index_path.exists()
    done = ShardedWriter(tmp_path, "other", infos, None, 8)
    for name in done.order:
        done.write(name, tensors[name])
    with pytest.raises(RuntimeError, match="all 2 tensors"):
        done.write("c", torch.zeros(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_written_and_loaded(tmp_path: Path):
    tensors = {"w": torch.randn(3, 4, device="cuda").t(), "b": torch.randn(2).bfloat16()}
    path = tmp_path / "cuda.safetensors"
    save_file(tensors, path)
    loaded = load_file(path, device="cuda")
    for name, tensor in tensors.items():
        assert loaded[name].device.type == "cuda"
        assert torch.equal(loaded[name].cpu(), tensor.cpu())


def test_a_file_is_validated_once_however_many_tensors_it_holds(tmp_path: Path, monkeypatch):
    """Reading is linear: one official header parse per file, then reads by offset."""
    import bnnify.formats.safetensors_header as reader

    tensors = {f"t{i}": torch.full((3,), float(i)) for i in range(200)}
    save_file(tensors, tmp_path / "many.safetensors")
    opened = []
    original = reader.safe_open
    monkeypatch.setattr(reader, "safe_open", lambda *a, **k: opened.append(a) or original(*a, **k))
    loaded = load_file(tmp_path / "many.safetensors")
    assert len(opened) == 1
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
