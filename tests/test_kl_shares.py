"""The tensors that dominate a conversion's KL, and those that look like buffers."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from cli_helpers import flat, invoke
from torch import nn

from bnnify.usecases.kl_shares import RATIO, buffer_like, exclude_flags, largest


@dataclass
class Summary:
    name: str
    numel: int
    kl: float


def test_largest_lists_the_top_shares_first():
    params = [Summary("a", 10, 1.0), Summary("b", 10, 7.0), Summary("c", 80, 2.0)]
    top = largest(params, top=2)
    assert [(s.name, s.share, s.elements_share) for s in top] == [("b", 0.7, 0.1), ("c", 0.2, 0.8)]


def test_buffer_like_by_name_and_by_a_share_out_of_scale():
    params = [
        Summary("enc.weight", 1000, 4000.0),
        Summary("stft_conv.weight", 1000, 4000.0),  # the name only
        Summary("scale", 1, 4000.0),  # the share only
        Summary("bias", 10, 50.0),  # 1.2x its size share: fine
    ]
    found = {s.name: s.reasons for s in buffer_like(params)}
    assert set(found) == {"stft_conv.weight", "scale"}
    assert found["stft_conv.weight"] == ["its name matches '*stft*'"]
    assert "of the KL with" in found["scale"][0]
    # One element in 100 carrying just over RATIO times its share: flagged; just under: not.
    for kl, flagged in ((10.01, ["s"]), (9.99, [])):
        edge = [Summary("w", 99, 100.0 - kl), Summary("s", 1, kl)]
        assert [s.name for s in buffer_like(edge)] == flagged
        assert RATIO == 10


def test_exclude_flags_group_suspects_by_last_name_when_that_is_exact():
    names = ["a.frequencies", "b.frequencies", "c.weight", "d.table[0]"]
    suspects = [Summary(n, 1, 1.0) for n in ("a.frequencies", "b.frequencies", "d.table[0]")]
    shares = buffer_like(suspects)
    assert exclude_flags(shares, names) == ["*.frequencies", "d.table[[]0]"]
    # A pattern that would drop a parameter not suspected: names instead.
    assert exclude_flags(shares[:1], names) == ["a.frequencies"]


class Tabled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("lookup_table", torch.full((8,), 1000.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.lookup_table


def test_convert_warns_about_a_buffer_of_a_state_dict_and_says_how_to_drop_it(tmp_path):
    torch.save(Tabled().state_dict(), tmp_path / "sd.pt")
    result = invoke("convert", tmp_path / "sd.pt", "-o", tmp_path / "a.bnn.safetensors", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [s["name"] for s in data["buffer_like"]] == ["lookup_table"]
    assert data["buffer_like"][0]["share"] > 0.99
    assert data["suggested_exclude"] == ["lookup_table"]
    assert data["largest"][0]["name"] == "lookup_table"
    warning = flat(result.stderr)
    assert "Warning:" in warning and "--exclude 'lookup_table'" in warning
    again = invoke(
        "convert", tmp_path / "sd.pt", "-o", tmp_path / "b.bnn.safetensors", "--json",
        "--exclude", "lookup_table",
    )  # fmt: skip
    assert again.exit_code == 0 and again.stderr == ""
    assert json.loads(again.stdout)["buffer_like"] == []


@pytest.mark.parametrize("fmt", ["torchscript", "export", "arch"])
def test_a_known_architecture_says_what_is_a_buffer_so_nothing_is_guessed(tmp_path, fmt):
    model, flags = tmp_path / "m.pt", []
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(Tabled()), str(model))
    elif fmt == "export":
        torch.export.save(torch.export.export(Tabled(), (torch.randn(2, 8),)), str(model))
    else:
        torch.save(Tabled().state_dict(), model)
        (tmp_path / "spec.yaml").write_text('arch: "test_kl_shares:Tabled"\n')
        flags = ["-c", tmp_path / "spec.yaml", "--arch", "test_kl_shares:Tabled"]
    out = tmp_path / "a.bnn.safetensors"
    result = invoke("convert", model, "-o", out, "--json", *flags)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [p["name"] for p in data["parameters"]] == ["fc.weight", "fc.bias"]
    assert "lookup_table" in data["deterministic"]
    assert data["buffer_like"] == [] and result.stderr == ""


def test_the_human_summary_names_the_largest_kl(tmp_path):
    torch.save(Tabled().state_dict(), tmp_path / "sd.pt")
    result = invoke("convert", tmp_path / "sd.pt", "-o", tmp_path / "a.bnn.safetensors")
    assert "Largest KL (share of the KL, of the elements): lookup_table 100% (10%), fc." in flat(
        result.stdout
    )
