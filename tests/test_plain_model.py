"""Tests of bnnify.formats.plain_model: plain model files written and read back as they were."""

from __future__ import annotations

import json
import warnings
import zipfile

import pytest
import torch
from safetensors import safe_open
from torch import nn

from bnnify.enums import ExportFormat
from bnnify.formats.plain_model import EXTENSIONS, independent, read_plain, write_plain

PROVENANCE = {"checkpoint": "m.bnn.safetensors", "weights": "mean"}


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()


def test_extensions_differ_so_default_names_never_collide():
    assert len(set(EXTENSIONS.values())) == len(ExportFormat)


def test_independent_clones_views_once_and_keeps_ties():
    flat = torch.arange(10.0)
    view = flat[2:6].view(2, 2)
    tensors = independent({"a": view, "tied": view, "b": flat[:2]})
    assert tensors["a"] is tensors["tied"]
    assert tensors["a"].untyped_storage().nbytes() == 16  # not the whole flat storage
    assert torch.equal(tensors["a"], view)


@pytest.mark.parametrize("fmt", [ExportFormat.STATE_DICT, ExportFormat.SAFETENSORS])
def test_state_dicts_round_trip_bit_exact(tmp_path, fmt):
    state = _net().state_dict()
    path = tmp_path / f"m{EXTENSIONS[fmt]}"
    write_plain(state, fmt, path, PROVENANCE)
    found = read_plain(path, fmt)
    assert set(found) == set(state)
    for name, tensor in state.items():
        assert torch.equal(found[name], tensor)
    if fmt is ExportFormat.SAFETENSORS:
        with safe_open(str(path), "pt") as file:
            assert json.loads(file.metadata()["bnnify.export"]) == PROVENANCE
    else:
        assert torch.load(path, weights_only=True).keys() == state.keys()


def test_torchscript_and_export_round_trip_with_their_provenance(tmp_path):
    net = _net()
    x = torch.randn(5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated
        script = torch.jit.script(net)
    program = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    for fmt, content in ((ExportFormat.TORCHSCRIPT, script), (ExportFormat.EXPORT, program)):
        path = tmp_path / f"m{EXTENSIONS[fmt]}"
        write_plain(content, fmt, path, PROVENANCE)
        module = read_plain(path, fmt)
        torch.testing.assert_close(module(x), net(x), rtol=0, atol=1e-6)
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("bnnify.json"))
            assert json.loads(archive.read(name)) == PROVENANCE
