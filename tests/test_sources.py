"""Tests of bnnify.usecases.sources: paths and objects in memory, opened one way."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bnnify.errors import ArgumentTypeError, InputError
from bnnify.formats.data import Dataset
from bnnify.formats.model_files import ModelFormat, load_model
from bnnify.usecases.sources import as_dataset, file_paths, opened_model, path_of


def test_a_dataset_from_a_file_tensors_or_a_dataset(tmp_path):
    x, y = torch.randn(6, 2), torch.randn(6)
    save_file({"x": x, "y": y}, str(tmp_path / "d.safetensors"))
    from_file = as_dataset(tmp_path / "d.safetensors")
    assert torch.equal(from_file.x.tensors["x"], x) and torch.equal(from_file.y, y)
    from_tensors = as_dataset((x, y))
    assert torch.equal(from_tensors.x.tensors["x"], x) and from_tensors.source == "<tensors>"
    one_feature = as_dataset(torch.arange(4.0), with_target=False)
    assert one_feature.x.tensors["x"].shape == (4, 1) and one_feature.y is None
    assert as_dataset(Dataset(x, y, "mine")).source == "mine"


def test_targets_given_apart(tmp_path):
    x, y = torch.randn(5, 3), torch.arange(5)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    save_file({"labels": y}, str(tmp_path / "y.safetensors"))
    for inputs in (tmp_path / "x.safetensors", x):
        for targets in (tmp_path / "y.safetensors", y):
            data = as_dataset(inputs, with_target=False, targets=targets)
            assert torch.equal(data.y, y)


def test_data_are_checked_whatever_their_origin():
    with pytest.raises(InputError, match="NaN or infinite"):
        as_dataset((torch.tensor([[1.0], [float("nan")]]), torch.zeros(2)))
    with pytest.raises(InputError, match="3 input examples but 2 targets"):
        as_dataset((torch.zeros(3, 1), torch.zeros(2)))
    with pytest.raises(InputError, match="no targets"):
        as_dataset(torch.zeros(3, 1))
    with pytest.raises(ArgumentTypeError, match="got list"):
        as_dataset([1.0, 2.0])


def test_a_model_file_is_closed_after_the_block_and_a_loaded_one_is_not(tmp_path):
    net = nn.Linear(2, 3)
    torch.save(net.state_dict(), tmp_path / "net.pt")
    with opened_model(tmp_path / "net.pt") as loaded:
        assert loaded.format is ModelFormat.STATE_DICT
    with pytest.raises(Exception, match="was closed"):
        loaded.tensor("weight")
    with load_model(tmp_path / "net.pt") as mine:
        with opened_model(mine) as same:
            assert same is mine
        assert torch.equal(mine.tensor("weight"), net.weight.detach())
    with opened_model(net) as module:
        assert module.format is ModelFormat.MODULE and module.module is net
    with pytest.raises(ArgumentTypeError, match="model: expected a path"):
        opened_model(42).__enter__()


def test_the_files_among_the_inputs(tmp_path):
    torch.save(nn.Linear(1, 1).state_dict(), tmp_path / "m.pt")
    with load_model(tmp_path / "m.pt") as model, opened_model(nn.Linear(1, 1)) as module:
        paths = file_paths("a.pt", tmp_path / "b", model, module, torch.zeros(1), None)
    assert [str(p) for p in paths] == ["a.pt", str(tmp_path / "b"), str(tmp_path / "m.pt")]
    assert path_of("c.bnn.safetensors").name == "c.bnn.safetensors"
