"""Tests of bnnify.formats.data: safetensors, .npy, .npz and CSV data sets, and their validation."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bnnify.errors import InputError
from bnnify.formats.data import Dataset, load_dataset, load_tensor_file

NPY_DTYPES = [
    (np.float16, torch.float16),
    (np.float32, torch.float32),
    (np.float64, torch.float64),
    (np.int8, torch.int8),
    (np.int16, torch.int16),
    (np.int32, torch.int32),
    (np.int64, torch.int64),
    (np.uint8, torch.uint8),
    (np.bool_, torch.bool),
]


def write_csv(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- safetensors


def test_safetensors_with_default_and_custom_keys(tmp_path):
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    save_file({"features": x, "labels": y, "extra": torch.zeros(1)}, str(tmp_path / "d.st"))
    data = load_dataset(tmp_path / "d.st", x_key="features", y_key="labels")
    assert isinstance(data, Dataset)
    assert data.x.names == ["features"]  # the input's name: forward's parameter, or the first
    assert torch.equal(data.x.tensors["features"], x) and torch.equal(data.y, y) and len(data) == 5
    assert data.source == str(tmp_path / "d.st")
    only_x = load_dataset(tmp_path / "d.st", x_key="features", with_target=False)
    assert only_x.y is None


def test_one_dimensional_inputs_become_one_feature(tmp_path):
    save_file({"x": torch.arange(4.0), "y": torch.arange(4.0)}, str(tmp_path / "d.safetensors"))
    data = load_dataset(tmp_path / "d.safetensors")
    assert data.x.tensors["x"].shape == (4, 1)
    assert data.y.shape == (4,)


def test_missing_keys_list_the_tensors_found(tmp_path):
    save_file({"a": torch.zeros(2, 1), "b": torch.zeros(2)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(InputError, match=r"no tensor 'x' \(found: a, b\)") as error:
        load_dataset(tmp_path / "d.safetensors")
    assert "--x-key" in error.value.hint
    with pytest.raises(InputError, match=r"no tensor 'y' \(found: a, b\)") as error:
        load_dataset(tmp_path / "d.safetensors", x_key="a")
    assert "--y-key" in error.value.hint


# ------------------------------------------------------------------------ npy


@pytest.mark.parametrize(("np_dtype", "torch_dtype"), NPY_DTYPES)
@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_of_every_dtype_and_order(tmp_path, np_dtype, torch_dtype, order):
    array = np.asarray(np.arange(24).reshape(2, 3, 4) % 7, dtype=np_dtype, order=order)
    assert array.flags["F_CONTIGUOUS" if order == "F" else "C_CONTIGUOUS"]
    np.save(tmp_path / "a.npy", array)
    tensor = load_tensor_file(tmp_path / "a.npy")["x"]
    assert tensor.dtype == torch_dtype
    assert tensor.shape == (2, 3, 4)
    assert tensor.tolist() == array.tolist()


def test_npy_version_2_header_and_empty_and_scalar_arrays(tmp_path):
    array = np.random.default_rng(0).normal(size=(3, 2))
    with open(tmp_path / "v2.npy", "wb") as file:
        np.lib.format.write_array(file, array, version=(2, 0))
    assert load_tensor_file(tmp_path / "v2.npy")["x"].tolist() == array.tolist()
    np.save(tmp_path / "empty.npy", np.zeros((0, 3), dtype=np.float32))
    assert load_tensor_file(tmp_path / "empty.npy")["x"].shape == (0, 3)
    with pytest.raises(InputError, match=r"no examples in the inputs \(shape \(0, 3\)\)"):
        load_dataset(tmp_path / "empty.npy", with_target=False)
    np.save(tmp_path / "scalar.npy", np.float32(2.5))
    assert float(load_tensor_file(tmp_path / "scalar.npy")["x"]) == 2.5
    with pytest.raises(InputError, match="no examples"):
        load_dataset(tmp_path / "scalar.npy", with_target=False)


@pytest.mark.parametrize(
    "array",
    [
        np.array([{"a": 1}, None], dtype=object),
        np.array([1.0, 2.0], dtype=">f4"),
        np.array([1 + 2j]),
        np.array(["text"]),
    ],
    ids=["object", "big-endian", "complex", "unicode"],
)
def test_npy_of_unsupported_dtypes_is_refused(tmp_path, array):
    np.save(tmp_path / "bad.npy", array, allow_pickle=True)
    with pytest.raises(InputError, match=r"unsupported \.npy dtype") as error:
        load_dataset(tmp_path / "bad.npy", with_target=False)
    assert "not objects" in error.value.hint


def test_truncated_and_malformed_npy(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((10, 2)))
    raw = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(raw[:-8])
    with pytest.raises(InputError, match="truncated"):
        load_tensor_file(tmp_path / "short.npy")
    header_end = raw.index(b"\n") + 1
    broken = raw[:10] + raw[10:header_end].replace(b"'shape'", b"'shapes'") + raw[header_end:]
    (tmp_path / "broken.npy").write_bytes(broken)
    with pytest.raises(InputError, match=r"malformed \.npy header"):
        load_tensor_file(tmp_path / "broken.npy")


def test_npy_targets_from_a_separate_file(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((4, 2), dtype=np.float32))
    np.save(tmp_path / "y.npy", np.array([0, 1, 1, 0]))
    data = load_dataset(tmp_path / "x.npy", with_target=False, targets_path=tmp_path / "y.npy")
    assert data.y.tolist() == [0, 1, 1, 0]
    np.save(tmp_path / "y3.npy", np.array([0, 1, 1]))
    with pytest.raises(InputError, match="4 input examples but 3 targets"):
        load_dataset(tmp_path / "x.npy", with_target=False, targets_path=tmp_path / "y3.npy")


# ------------------------------------------------------------------------ npz


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_with_keys(tmp_path, save):
    x = np.random.default_rng(1).normal(size=(6, 2)).astype(np.float32)
    y = np.arange(6) % 3
    save(tmp_path / "d.npz", inputs=x, classes=y)
    data = load_dataset(tmp_path / "d.npz", x_key="inputs", y_key="classes")
    assert data.x.tensors["inputs"].tolist() == x.tolist()
    assert data.y.tolist() == y.tolist()
    with pytest.raises(InputError, match=r"no tensor 'x' \(found: inputs, classes\)"):
        load_dataset(tmp_path / "d.npz")


def test_zip_without_arrays_and_unknown_files_are_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(InputError, match=r"not a safetensors, .npy, .npz or CSV file"):
        load_dataset(tmp_path / "other.npz")
    (tmp_path / "noise.bin").write_bytes(bytes(range(256)))
    with pytest.raises(InputError, match="not a safetensors"):
        load_dataset(tmp_path / "noise.bin")
    with pytest.raises(InputError, match="does not exist"):
        load_dataset(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------ CSV


def test_csv_with_header_target_by_name_index_and_default(tmp_path):
    path = write_csv(tmp_path / "d.csv", "a,label,b\n1,0,2\n3,1,4\n5,2,6\n")
    by_name = load_dataset(path, target="label")
    assert by_name.x.tensors["x"].tolist() == [[1, 2], [3, 4], [5, 6]]
    assert by_name.y.tolist() == [0, 1, 2]
    by_index = load_dataset(path, target="1")
    assert torch.equal(by_index.x.tensors["x"], by_name.x.tensors["x"]) and torch.equal(
        by_index.y, by_name.y
    )
    negative = load_dataset(path, target="-2")
    assert torch.equal(negative.y, by_name.y)
    last = load_dataset(path)
    assert last.x.tensors["x"].tolist() == [[1, 0], [3, 1], [5, 2]]
    assert last.y.tolist() == [2, 4, 6]
    assert last.x.tensors["x"].dtype == torch.float64


def test_csv_without_header_with_bom_blank_lines_and_spaces(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeff1.5, 2\n\n-3e-1 ,4\n".encode())
    data = load_dataset(path)
    assert data.x.tensors["x"].tolist() == [[1.5], [-0.3]]
    assert data.y.tolist() == [2, 4]
    assert load_dataset(path, target="0").y.tolist() == [1.5, -0.3]
    assert load_dataset(path, with_target=False).x.tensors["x"].shape == (2, 2)


@pytest.mark.parametrize(
    ("text", "target", "message"),
    [
        ("a,b\n1,2\n", "c", r"no column 'c' \(columns: a, b\)"),
        ("1,2\n3,4\n", "name", r"no column 'name' \(no header row\)"),
        ("1,2\n3,4\n", "2", "column index 2 out of range"),
        ("1,2\n3,4\n", "-3", "column index -3 out of range"),
        ("a,b\n1,2\n3\n", None, "line 3 has 1 columns, expected 2"),
        ("a,b\n1,2\n3,x\n", None, "line 3 has a non-numeric value"),
        ("y\n1\n2\n", None, "at least one feature column"),
        ("a,b\n", None, "no data rows"),
        ("\n\n", None, "empty CSV file"),
    ],
)
def test_csv_errors(tmp_path, text, target, message):
    with pytest.raises(InputError, match=message):
        load_dataset(write_csv(tmp_path / "d.csv", text), target=target)


def test_csv_targets_file(tmp_path):
    write_csv(tmp_path / "x.csv", "1,2\n3,4\n")
    write_csv(tmp_path / "y.csv", "label\n1\n0\n")
    data = load_dataset(tmp_path / "x.csv", targets_path=tmp_path / "y.csv")
    assert data.x.tensors["x"].tolist() == [[1, 2], [3, 4]]
    assert data.y.tolist() == [1, 0]


def test_non_utf8_csv(tmp_path):
    (tmp_path / "d.csv").write_bytes(b"\xff\xfe1,2\n")
    with pytest.raises(InputError, match="not a UTF-8 text"):
        load_dataset(tmp_path / "d.csv")


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["x", "y"])
def test_non_finite_values_name_the_example(tmp_path, value, where):
    tensors = {"x": torch.zeros(6, 2), "y": torch.zeros(6)}
    tensors[where][4] = value
    save_file(tensors, str(tmp_path / "d.safetensors"))
    what = "the inputs" if where == "x" else "the targets"
    pattern = (
        f"{what} has {2 if where == 'x' else 1} NaN or infinite value\\(s\\), first in example 4"
    )
    with pytest.raises(InputError, match=pattern):
        load_dataset(tmp_path / "d.safetensors")


def test_nan_in_a_csv_is_found(tmp_path):
    path = write_csv(tmp_path / "d.csv", "a,y\n1,2\n3,nan\n")
    with pytest.raises(InputError, match=r"targets has 1 NaN .* example 1"):
        load_dataset(path)


def test_inputs_and_targets_of_different_lengths(tmp_path):
    save_file({"x": torch.zeros(5, 2), "y": torch.zeros(4)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(InputError, match="5 input examples but 4 targets") as error:
        load_dataset(tmp_path / "d.safetensors")
    assert "same first dimension" in error.value.hint


def test_targets_file_with_several_tensors_needs_the_key(tmp_path):
    save_file({"x": torch.zeros(3, 1)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.zeros(3), "b": torch.ones(3)}, str(tmp_path / "t.safetensors"))
    with pytest.raises(InputError, match=r"no tensor 'y' \(found: a, b\)"):
        load_dataset(tmp_path / "x.safetensors", targets_path=tmp_path / "t.safetensors")
    data = load_dataset(
        tmp_path / "x.safetensors", y_key="b", targets_path=tmp_path / "t.safetensors"
    )
    assert data.y.tolist() == [1, 1, 1]


def test_several_inputs_by_name_from_one_file(tmp_path):
    x, mask, y = torch.randn(5, 3), torch.ones(5, 7), torch.randn(5)
    save_file({"feats": x, "mask": mask, "y": y}, str(tmp_path / "d.st"))
    data = load_dataset(tmp_path / "d.st", x_key=["x=feats", "mask"])
    assert data.x.names == ["x", "mask"] and len(data) == 5
    assert torch.equal(data.x.tensors["x"], x) and torch.equal(data.x.tensors["mask"], mask)
    ids = torch.arange(5)  # among several inputs, a 1-D one stays one value per example
    save_file({"x": x, "ids": ids, "y": y}, str(tmp_path / "ids.st"))
    assert load_dataset(tmp_path / "ids.st", x_key=["x", "ids"]).x.tensors["ids"].shape == (5,)
    with pytest.raises(InputError, match=r"no tensor 'lengths' \(found: feats, mask, y\)"):
        load_dataset(tmp_path / "d.st", x_key=["feats", "lengths"])
    save_file({"x": x, "mask": torch.ones(4, 7), "y": y}, str(tmp_path / "short.st"))
    with pytest.raises(InputError, match=r"short.st: the inputs have different numbers"):
        load_dataset(tmp_path / "short.st", x_key=["x", "mask"])
    (tmp_path / "d.csv").write_text("1,2,3\n4,5,6\n")
    with pytest.raises(InputError, match="a CSV file holds one input"):
        load_dataset(tmp_path / "d.csv", x_key=["x", "mask"])
