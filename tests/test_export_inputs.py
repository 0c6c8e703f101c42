"""torch.export programs: inputs of shapes the export fixed are refused clearly."""

from __future__ import annotations

import io
import json

import pytest
import torch
from cli_helpers import flat, invoke
from safetensors.torch import save_file
from torch import nn

from bnnify.errors import InputError
from bnnify.formats.export_archive import unlift
from bnnify.formats.export_inputs import module_types
from bnnify.formats.model_files import load_model


def save_program(path, dynamic: bool):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).eval()
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(net, (torch.randn(2, 4),), dynamic_shapes=shapes), buffer)
    path.write_bytes(buffer.getvalue())
    return path


def test_a_fixed_batch_is_refused_before_torchs_guard(tmp_path):
    path = save_program(tmp_path / "fixed.pt2", dynamic=False)
    with load_model(path) as loaded:
        module = unlift(loaded.module, path)
        assert module(torch.randn(2, 4)).shape == (2, 1)
        with pytest.raises(InputError, match=r"dimension 0 was fixed at 2.*got shape \(5, 4\)"):
            module(torch.randn(5, 4))
        with pytest.raises(InputError, match=r"2 dimensions \(2, 4\), got shape \(2, 4, 1\)"):
            module(torch.randn(2, 4, 1))
        assert module_types(loaded.module)["0"] == "torch.nn.modules.linear.Linear"


def test_a_dynamic_batch_takes_any_size_but_not_another_feature_count(tmp_path):
    path = save_program(tmp_path / "dynamic.pt2", dynamic=True)
    with load_model(path) as loaded:
        module = unlift(loaded.module, path)
        assert module(torch.randn(7, 4)).shape == (7, 1)
        with pytest.raises(InputError, match="dimension 1 was fixed at 4"):
            module(torch.randn(7, 3))


@pytest.mark.parametrize("rows", [3, 6])
def test_predict_says_the_program_takes_the_exported_shape_only(tmp_path, rows):
    path = save_program(tmp_path / "fixed.pt2", dynamic=False)
    ckpt = tmp_path / "fixed.bnn.safetensors"
    assert invoke("convert", path, "-o", ckpt, "--json").exit_code == 0
    save_file({"x": torch.randn(rows, 4)}, str(tmp_path / "x.safetensors"))
    result = invoke(
        "predict", ckpt, "--model", path, "--input", tmp_path / "x.safetensors",
        "--batch-size", "4", "--json",
    )  # fmt: skip
    assert result.exit_code == 1 and result.stdout == ""
    message = flat(result.stderr)
    assert "internal error" not in message and "Guard failed" not in message
    assert "fixed at 2" in message and "dynamic" in message


def test_predict_runs_a_dynamic_program_at_any_batch_size(tmp_path):
    path = save_program(tmp_path / "dynamic.pt2", dynamic=True)
    ckpt = tmp_path / "dynamic.bnn.safetensors"
    assert invoke("convert", path, "-o", ckpt, "--json").exit_code == 0
    save_file({"x": torch.randn(6, 4)}, str(tmp_path / "x.safetensors"))
    result = invoke(
        "predict", ckpt, "--model", path, "--input", tmp_path / "x.safetensors",
        "--batch-size", "4", "--samples", "4", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["examples"] == 6


def test_export_says_the_program_takes_the_exported_shape_only(tmp_path):
    # `bnnify export` runs a copy of the module: the copy must refuse clearly too.
    path = save_program(tmp_path / "fixed.pt2", dynamic=False)
    ckpt = tmp_path / "fixed.bnn.safetensors"
    assert invoke("convert", path, "-o", ckpt, "--json").exit_code == 0
    save_file({"x": torch.randn(2, 3)}, str(tmp_path / "x.safetensors"))
    result = invoke(
        "export", ckpt, "--model", path, "--input", tmp_path / "x.safetensors",
        "--weights", "ensemble:2", "--format", "export", "-o", tmp_path / "e.pt2",
    )  # fmt: skip
    assert result.exit_code == 1 and result.stdout == ""
    message = flat(result.stderr)
    assert "internal error" not in message and "Guard failed" not in message
    assert "dimension 1 was fixed at 4" in message
    assert not (tmp_path / "e.pt2").exists()
