"""Tests of module trees rebuilt from state dicts, and of the default deterministic rule."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bnnify.bnn import BayesianModule
from bnnify.errors import FormatError, InvalidArgumentError, UsageError
from bnnify.formats.model_files import load_model
from bnnify.formats.tree import StateDictTree, build_tree, default_deterministic


def _source():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6)),
    )
    net[1](torch.randn(5, 4, 2, 2))  # non-trivial running statistics
    return net


def _default_parameters(state):
    return [name for name, tensor in state.items() if not default_deterministic(name, tensor)]


def test_the_tree_round_trips_a_state_dict():
    state = _source().state_dict()
    parameters = _default_parameters(state)
    tree = build_tree(state, parameters)
    assert isinstance(tree, StateDictTree)
    rebuilt = tree.state_dict()
    assert list(rebuilt) == list(state)
    for name, tensor in state.items():
        assert rebuilt[name].dtype == tensor.dtype and torch.equal(rebuilt[name], tensor)
        assert rebuilt[name].data_ptr() == tensor.data_ptr()  # shared, not copied
    assert list(dict(tree.named_parameters())) == parameters
    assert set(dict(tree.named_buffers())) == set(state) - set(parameters)
    assert all(p.requires_grad for p in tree.parameters())
    assert isinstance(tree.get_submodule("2.0"), nn.Module)
    fresh = _source()
    fresh.load_state_dict(tree.state_dict())  # the names mirror the original modules


def test_the_chosen_names_become_parameters_whatever_their_role():
    state = {"a.w": torch.ones(2), "a.stat": torch.zeros(2), "b.count": torch.tensor(3)}
    tree = build_tree(state, ["a.stat", "b.count"])
    assert list(dict(tree.named_parameters())) == ["a.stat", "b.count"]
    assert list(dict(tree.named_buffers())) == ["a.w"]
    assert not tree.get_parameter("b.count").requires_grad  # integers cannot be trained


def test_bayesian_module_converts_the_tree():
    state = _source().state_dict()
    parameters = _default_parameters(state)
    bnn = BayesianModule(build_tree(state, parameters))
    assert set(bnn.sample_parameters()) == set(parameters)
    assert bool(bnn.kl_divergence() > 0)
    with pytest.raises(UsageError, match="no forward"):
        bnn(torch.ones(1))


def test_a_loaded_safetensors_file_becomes_a_tree(tmp_path):
    state = {k: v.contiguous() for k, v in _source().state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    with load_model(tmp_path) as model:
        tensors = {name: model.tensor(name) for name in model.names()}
        parameters = [n for n in model.names() if not default_deterministic(n, model.meta(n))]
    tree = build_tree(tensors, parameters)
    assert set(tree.state_dict()) == set(state)
    assert set(dict(tree.named_parameters())) == set(_default_parameters(state))


@pytest.mark.parametrize(
    "names",
    [["a", "a.b"], ["a.b", "a"], ["x.a", "x.a.b.c"], ["x.a.b.c", "x.a"]],
    ids=["tensor-first", "module-first", "deep-tensor-first", "deep-module-first"],
)
def test_a_name_that_is_both_a_tensor_and_a_module_is_refused(names):
    tensors = {name: torch.ones(1) for name in names}
    with pytest.raises(FormatError, match="clash") as caught:
        build_tree(tensors, names[:1])
    assert all(repr(name) in str(caught.value) for name in names)


@pytest.mark.parametrize("name", ["a..b", ".a", "a.", ""])
def test_malformed_names_are_refused(name):
    with pytest.raises(FormatError, match="empty component"):
        build_tree({name: torch.ones(1)}, [])


@pytest.mark.parametrize("name", ["eval.weight", "layer.training", "forward"])
def test_names_of_module_attributes_are_refused(name):
    with pytest.raises(FormatError, match=r"attribute of torch\.nn\.Module"):
        build_tree({name: torch.ones(1)}, [name])


def test_parameters_must_be_tensors_of_the_state_dict():
    with pytest.raises(InvalidArgumentError, match=r"fc\.bias"):
        build_tree({"fc.weight": torch.ones(1)}, ["fc.weight", "fc.bias"])


@pytest.mark.parametrize(
    ("name", "tensor", "expected"),
    [
        ("fc.weight", torch.ones(2), False),
        ("bn.running_mean", torch.ones(2), True),
        ("bn.running_var", torch.ones(2), True),
        ("bn.num_batches_tracked", torch.tensor(3), True),
        ("embeddings.position_ids", torch.arange(4.0), True),
        ("layers.0.rotary.inv_freq", torch.ones(2), True),
        ("h.0.attn.bias", torch.ones(1, 1, 4, 4), True),
        ("h.0.attn.masked_bias", torch.tensor(-1e4), True),
        ("h.0.crossattention.bias", torch.ones(1, 1, 4, 4), True),
        ("h.0.attn.c_attn.bias", torch.ones(4), False),
        ("h.0.crossattention.c_attn.bias", torch.ones(4), False),
        ("h.0.attn.c_proj.bias", torch.ones(4), False),
        ("mask", torch.ones(3, dtype=torch.bool), True),
        ("ids", torch.arange(3), True),
        ("freqs_cis", torch.ones(2, dtype=torch.complex64), True),
        ("scale", torch.ones(2, dtype=torch.bfloat16), False),
    ],
)
def test_default_deterministic(name, tensor, expected):
    assert default_deterministic(name, tensor) is expected
