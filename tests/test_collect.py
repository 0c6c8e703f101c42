"""Tests of parameter discovery, tying, include/exclude patterns and local-trick layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnnify.bnn.collect import collect_parameters, linear_pairs, matches, select
from bnnify.errors import InvalidArgumentError, UsageError


class TiedLM(nn.Module):
    """Embedding and output head sharing one weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.norm(self.embed(tokens)))


def _names(entries):
    return [entry.name for entry in entries]


def test_collect_in_registration_order():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1, bias=False))
    entries = collect_parameters(net)
    assert _names(entries) == ["0.weight", "0.bias", "2.weight"]
    assert all(len(e.owners) == 1 for e in entries)
    assert entries[0].owners == [(net[0], "weight")]
    assert entries[0].param is net[0].weight


def test_tied_parameter_appears_once_with_every_alias():
    model = TiedLM()
    entries = collect_parameters(model)
    assert _names(entries) == ["embed.weight", "norm.weight", "norm.bias"]
    tied = entries[0]
    assert tied.aliases == ["embed.weight", "head.weight"]
    assert tied.owners == [(model.embed, "weight"), (model.head, "weight")]


def test_shared_submodule_has_one_owner_and_two_aliases():
    shared = nn.Linear(3, 3)
    net = nn.Sequential(shared, nn.Tanh(), shared)
    entries = collect_parameters(net)
    assert [e.aliases for e in entries] == [["0.weight", "2.weight"], ["0.bias", "2.bias"]]
    assert entries[0].owners == [(shared, "weight")]


def test_module_without_parameters_is_refused():
    with pytest.raises(UsageError, match="ReLU has no parameters") as info:
        collect_parameters(nn.Sequential(nn.ReLU()).get_submodule("0"))
    assert info.value.hint


# ---------------------------------------------------------------- include / exclude


def _net():
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2), nn.LayerNorm(2)
    )


ALL = ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias", "4.weight", "4.bias"]


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (None, None, ALL),
        ("*.weight", None, ["0.weight", "1.weight", "3.weight", "4.weight"]),
        (["0.*", "3.*"], None, ["0.weight", "0.bias", "3.weight", "3.bias"]),
        (None, "*bias", ["0.weight", "1.weight", "3.weight", "4.weight"]),
        (None, ["1.*", "4.*"], ["0.weight", "0.bias", "3.weight", "3.bias"]),
        ("*.weight", ["1.*", "4.*"], ["0.weight", "3.weight"]),
        ("3.bias", None, ["3.bias"]),
        ("[03].weight", None, ["0.weight", "3.weight"]),
    ],
)
def test_select_patterns(include, exclude, expected):
    assert _names(select(collect_parameters(_net()), include, exclude)) == expected


def test_star_spans_dots_and_matching_ignores_case():
    assert matches("encoder.layers.0.attn.weight", ["encoder.*weight"])
    assert matches("encoder.weight", ["Encoder.*"])
    assert matches("a.b", ["x", "a.?"])
    assert not matches("a.b", ["a.c"])


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("blocks.0.LayerNorm.weight", "*norm*"),
        ("conv1_BN.weight", "*bn*"),
        ("Encoder.LN_1.bias", "*ln_*"),
        ("layer.norm.weight", "*NORM*"),
        ("Block.weight", "block.[W]eight"),
    ],
)
def test_patterns_match_whatever_the_case(name, pattern):
    assert matches(name, [pattern])


def test_select_excludes_mixed_case_norms():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.LayerNorm = nn.LayerNorm(2)
            self.conv1_BN = nn.BatchNorm1d(2)

    chosen = select(collect_parameters(Net()), "*.weight", ["*norm*", "*bn*"])
    assert _names(chosen) == ["fc.weight"]


def test_tied_parameter_matches_through_any_alias():
    entries = collect_parameters(TiedLM())
    assert _names(select(entries, "head.*", None)) == ["embed.weight"]
    assert _names(select(entries, None, "head.weight")) == ["norm.weight", "norm.bias"]


@pytest.mark.parametrize(
    ("include", "exclude"), [("nothing*", None), (None, "*"), ("*.weight", "*.weight")]
)
def test_patterns_matching_nothing_list_the_names(include, exclude):
    with pytest.raises(UsageError, match="no parameter matches") as info:
        select(collect_parameters(_net()), include, exclude)
    for name in ALL:
        assert name in info.value.hint


def test_long_name_lists_are_shortened():
    net = nn.Sequential(*[nn.Linear(1, 1) for _ in range(10)])
    with pytest.raises(UsageError) as info:
        select(collect_parameters(net), "nothing", None)
    assert "0.weight" in info.value.hint and info.value.hint.endswith(", ....")
    assert "9.bias" not in info.value.hint


@pytest.mark.parametrize("patterns", ["", [""], ["ok", 3], [None]])
def test_invalid_patterns(patterns):
    with pytest.raises(InvalidArgumentError, match="non-empty strings"):
        select(collect_parameters(_net()), patterns, None)
    with pytest.raises(InvalidArgumentError, match="exclude patterns"):
        select(collect_parameters(_net()), None, patterns)


def test_non_floating_parameters_are_skipped():
    net = nn.Linear(2, 2)
    net.steps = nn.Parameter(torch.tensor([3]), requires_grad=False)
    assert _names(select(collect_parameters(net), None, None)) == ["weight", "bias"]
    with pytest.raises(UsageError, match="no parameter matches"):
        select(collect_parameters(net), "steps", None)


# ---------------------------------------------------------------- local-trick layers


class Dense(nn.Linear):
    pass


def test_linear_pairs_qualify_plain_untied_linears():
    net = nn.Sequential(
        nn.Linear(2, 3), nn.Linear(3, 3, bias=False), Dense(3, 2), nn.Conv1d(1, 1, 1)
    )
    entries = collect_parameters(net)
    pairs = linear_pairs(net, entries)
    assert set(pairs) == {net[0], net[1]}
    weight, bias = pairs[net[0]]
    assert (weight.name, bias.name) == ("0.weight", "0.bias")
    assert pairs[net[1]][1] is None


def test_linear_pairs_refuse_tied_and_mixed_layers():
    model = TiedLM()
    assert linear_pairs(model, collect_parameters(model)) == {}
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3))
    # A deterministic bias has no variance: the trick needs nothing more.
    entries = select(collect_parameters(net), None, "1.bias")
    pairs = linear_pairs(net, entries)
    assert set(pairs) == {net[0], net[1]} and pairs[net[1]][1] is None
    assert linear_pairs(net, select(collect_parameters(net), None, "1.weight")).keys() == {net[0]}
    mixed = nn.Linear(2, 2)
    mixed.bias = nn.Parameter(mixed.bias.detach().double())
    assert linear_pairs(mixed, collect_parameters(mixed)) == {}
    shared = nn.Linear(2, 2)
    twice = nn.Sequential(shared, shared)
    assert set(linear_pairs(twice, collect_parameters(twice))) == {shared}
