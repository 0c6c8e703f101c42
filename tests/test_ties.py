"""Tests of bnnify.formats.ties: the one rule deciding which tensors are tied."""

from __future__ import annotations

import torch
from torch import nn

from bnnify.formats.model_files import ModelFormat, load_model
from bnnify.formats.ties import alias_key, find_ties


def test_views_of_one_memory_with_one_layout_are_tied():
    weight = torch.randn(4, 3)
    assert alias_key(weight) == alias_key(weight.detach()) == alias_key(weight.view(4, 3))
    assert alias_key(weight) != alias_key(weight.t())  # same memory, other layout
    assert alias_key(weight) != alias_key(weight[1:])
    assert alias_key(weight) != alias_key(weight.clone())


def test_empty_tensors_tie_to_nothing():
    empty = torch.empty(0, 3)
    assert alias_key(empty) is None
    assert find_ties([("a", empty), ("b", empty)]) == {}


def test_find_ties_names_the_first_owner():
    shared = torch.ones(2)
    tensors = [("a", shared), ("b", torch.ones(2)), ("c", shared), ("d", shared.detach())]
    assert find_ties(tensors) == {"c": "a", "d": "a"}


def test_a_state_dict_lists_its_ties_and_other_formats_none(tmp_path):
    net = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    net[1].weight = net[0].weight
    torch.save(net.state_dict(), tmp_path / "tied.pt")
    torch.jit.save(torch.jit.script(net), str(tmp_path / "tied.script.pt"))
    with load_model(tmp_path / "tied.pt") as state:
        assert state.format is ModelFormat.STATE_DICT
        assert state.ties() == {"1.weight": "0.weight"}
    with load_model(tmp_path / "tied.script.pt") as script:
        assert script.ties() == {} and script.names() == ["0.weight"]
