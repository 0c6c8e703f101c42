"""Tests of bnnify.usecases.exporters and of `export`'s refusals: nothing silently wrong."""

from __future__ import annotations

import pytest
import torch
from fit_files import shared_fit_files
from torch import nn

import bnnify
from bnnify.errors import InputError, OutputExistsError, UsageError
from bnnify.formats.model_files import load_model
from bnnify.usecases import export as export_module
from bnnify.usecases.exporters import compare_outputs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return shared_fit_files(tmp_path_factory)


class _Lambda(nn.Module):
    """A module TorchScript cannot compile (a lambda in forward)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 3)

    def forward(self, x):
        double = lambda t: 2 * t  # noqa: E731
        return double(self.linear(x))


def test_check_outputs_refuses_a_difference_beyond_the_tolerance():
    x = torch.randn(4, 2)
    expected = torch.ones(4, 3)
    report = compare_outputs(lambda t: torch.ones(4, 3), x, expected)
    assert report["max_abs_diff"] == 0.0 and report["examples"] == 4
    with pytest.raises(InputError, match="does not reproduce"):
        compare_outputs(lambda t: torch.ones(4, 3) + 1e-2, x, expected)
    with pytest.raises(InputError, match="does not reproduce"):
        compare_outputs(lambda t: torch.full((4, 3), float("nan")), x, expected)


def test_a_file_that_does_not_reproduce_bnnify_is_not_written(files, tmp_path, monkeypatch):
    original = export_module.reference_outputs
    monkeypatch.setattr(export_module, "reference_outputs", lambda *args: original(*args) + 0.05)
    out = tmp_path / "m.pt2"
    x = torch.randn(8, 2)
    with pytest.raises(InputError, match="does not reproduce"):
        bnnify.export(files.cls_fitted, files.cls_model, inputs=x, output=out)
    assert list(tmp_path.iterdir()) == []


def test_the_callers_program_is_left_as_it_was(files, tmp_path):
    with load_model(files.cls_model) as loaded:
        before = {k: v.clone() for k, v in loaded.module.state_dict.items()}
        bnnify.export(files.cls_fitted, loaded, weights="sample", output=tmp_path / "s.pt2")
        after = loaded.module.state_dict
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert type(after["0.weight"]) is nn.Parameter


def test_outputs_are_exclusive_and_never_an_input(files, tmp_path):
    out = tmp_path / "m.state_dict.pt"
    bnnify.export(files.reg_fitted, files.reg_model, format="state_dict", output=out)
    with pytest.raises(OutputExistsError):
        bnnify.export(files.reg_fitted, files.reg_model, format="state_dict", output=out)
    bnnify.export(files.reg_fitted, files.reg_model, format="state_dict", output=out, force=True)
    with pytest.raises(UsageError, match="input"):
        bnnify.export(
            files.reg_fitted,
            files.reg_model,
            format="state_dict",
            output=files.reg_model,
            force=True,
        )


def test_refusals_come_before_any_work(files, tmp_path):
    with pytest.raises(UsageError, match="needs example inputs"):
        bnnify.export(files.reg_fitted, files.reg_model, output=tmp_path / "m.pt")
    with pytest.raises(UsageError, match="cannot become a torch"):
        bnnify.export(files.reg_fitted, files.reg_model, format="export", inputs=torch.zeros(2, 1))
    assert list(tmp_path.iterdir()) == []


def test_a_module_in_memory_and_one_torchscript_cannot_compile(tmp_path):
    torch.manual_seed(0)
    net = _Lambda().eval()
    converted = bnnify.convert(net, output=tmp_path / "m.bnn.safetensors")
    x = torch.randn(5, 2)
    state = bnnify.export(converted.outputs[0], net, output=tmp_path / "m.state_dict.pt")
    loaded = torch.load(state.output, weights_only=True)
    copy = _Lambda().eval()
    copy.load_state_dict(loaded)
    mean = bnnify.predict(converted.outputs[0], net, x, mean_weights=True).tensors["mean"]
    torch.testing.assert_close(copy(x), mean, rtol=0, atol=1e-6)
    with pytest.raises(UsageError, match="TorchScript cannot compile"):
        bnnify.export(converted.outputs[0], net, format="torchscript", output=tmp_path / "m.ts")
    program = bnnify.export(
        converted.outputs[0], net, format="export", inputs=x, output=tmp_path / "m.pt2"
    )
    assert program.check["max_abs_diff"] <= 1e-6 and program.dynamic_batch is True
