"""Tests of bnnify.usecases.model_call: forward's signature, inputs and constants bound to it,
and models with several inputs fitted and predicted through the CLI and the API."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from fit_files import cli, convert_file, fit_output, save_script, single_thread
from multi_input_models import MaskedRegressor, RateModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import bnnify
from bnnify.errors import InvalidArgumentError, SpecError
from bnnify.formats.model_inputs import Inputs
from bnnify.formats.spec import resolve_spec
from bnnify.usecases.model_call import (
    ForwardSignature,
    ModelCall,
    Parameter,
    forward_signature,
    model_arguments,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written to the working directory
    with single_thread():
        yield


def scripted(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(module)


# ----------------------------------------------------------------- signature


def test_the_signature_of_each_kind_of_model():
    rate = RateModel()
    expected = ForwardSignature((Parameter("x", True), Parameter("sr", True)))
    assert forward_signature(rate) == expected
    assert forward_signature(scripted(rate)) == expected
    assert forward_signature(nn.Sequential(nn.Linear(2, 2))) == ForwardSignature(
        (Parameter("input", True),)
    )

    class Defaults(nn.Module):
        def forward(self, x, mask=None, *, scale: float = 1.0):
            return x

    assert forward_signature(Defaults()) == ForwardSignature(
        (Parameter("x", True), Parameter("mask", False), Parameter("scale", False, True))
    )
    assert str(forward_signature(Defaults())) == "forward(x, mask=..., scale=...)"

    class ScriptDefaults(nn.Module):
        def forward(self, x, mask: torch.Tensor | None = None, scale: float = 1.0):
            return x

    script = forward_signature(scripted(ScriptDefaults()))
    assert [(p.name, p.required) for p in script.parameters] == [
        ("x", True),
        ("mask", False),
        ("scale", False),
    ]


def test_an_export_program_takes_the_arguments_it_was_exported_with():
    masked = MaskedRegressor().eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        masked,
        (torch.zeros(4, 3),),
        {"mask": torch.ones(4, 1)},
        dynamic_shapes={"x": {0: batch}, "mask": {0: batch}},
    )
    signature = forward_signature(program.module(), program)
    assert signature == ForwardSignature(
        (Parameter("x", True), Parameter("mask", True, keyword_only=True))
    )
    args, kwargs = ModelCall(signature).bind(
        Inputs({"x": torch.ones(2, 3), "mask": torch.ones(2, 1)})
    )
    assert len(args) == 1 and list(kwargs) == ["mask"]
    assert program.module()(*args, **kwargs).shape == (2, 1)


# -------------------------------------------------------------------- binding


def test_inputs_go_by_name_then_fill_the_first_free_parameters_in_order():
    signature = forward_signature(MaskedRegressor())
    x, mask = torch.zeros(3, 3), torch.ones(3, 1)
    args, kwargs = ModelCall(signature).bind(Inputs({"mask": mask, "x": x}))
    assert args[0] is x and args[1] is mask and kwargs == {}
    args, _ = ModelCall(signature).bind(Inputs({"features": x, "mask": mask}))
    assert args[0] is x and args[1] is mask
    args, _ = ModelCall(signature).bind(Inputs({"a": x, "b": mask}))
    assert args == (x, mask)
    assert ModelCall(signature).describe(["a", "mask"]) == {"x": "input a", "mask": "input mask"}


def test_constants_pass_unchanged_and_missing_or_unknown_arguments_are_refused():
    call = ModelCall(forward_signature(RateModel()), {"sr": 16000})
    args, kwargs = call.bind(Inputs(torch.zeros(2, 2)))
    assert args[1] == 16000 and kwargs == {}
    assert call.describe(["x"]) == {"x": "input x", "sr": 16000}
    with pytest.raises(InvalidArgumentError, match=r"needs 'sr'.*inputs: x") as error:
        ModelCall(forward_signature(RateModel())).bind(Inputs(torch.zeros(2, 2)))
    assert "--model-arg sr=VALUE" in error.value.hint
    with pytest.raises(InvalidArgumentError, match=r"has no parameter 'rate'") as error:
        ModelCall(forward_signature(RateModel()), {"rate": 16000})
    assert "x, sr" in error.value.hint
    with pytest.raises(InvalidArgumentError, match="both as an input tensor and as a model"):
        ModelCall(forward_signature(RateModel()), {"sr": 1}).bind(Inputs({"sr": torch.ones(2)}))
    with pytest.raises(InvalidArgumentError, match="no parameter left for input 'extra'"):
        ModelCall(forward_signature(nn.Linear(2, 2))).bind(
            Inputs({"x": torch.ones(2, 2), "extra": torch.ones(2)})
        )
    with pytest.raises(InvalidArgumentError, match="constants are numbers"):
        ModelCall(forward_signature(RateModel()), {"sr": torch.ones(2)})


def test_a_parameter_left_to_its_default_sends_the_later_ones_by_keyword():
    class Defaults(nn.Module):
        def forward(self, x, mask=None, scale: float = 1.0):
            return x

    call = ModelCall(forward_signature(Defaults()), {"scale": 2.0})
    args, kwargs = call.bind(Inputs(torch.zeros(2, 2)))
    assert len(args) == 1 and kwargs == {"scale": 2.0}


def test_model_arguments_are_yaml_scalars():
    assert model_arguments(["sr=16000", "on=true", "name=fast", "x=1e-3"]) == {
        "sr": 16000,
        "on": True,
        "name": "fast",
        "x": 0.001,
    }
    assert model_arguments({"sr": 8000}) == {"sr": 8000} and model_arguments(None) == {}
    with pytest.raises(SpecError, match="missing '='"):
        model_arguments(["sr"])


# ------------------------------------------------ end to end: CLI and the API


def fit_json(*args) -> dict:
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    # fit prints JSON Lines (its epochs, then the summary); the other commands one object.
    return fit_output(result.stdout) if args[0] == "fit" else json.loads(result.stdout)


@pytest.fixture(scope="module")
def rate_files(tmp_path_factory):
    """A scripted `forward(x, sr)` model, its checkpoint and data (targets of sr=16000)."""
    folder = tmp_path_factory.mktemp("rate")
    torch.manual_seed(0)
    net = RateModel().eval()
    model = save_script(net, folder / "rate.pt")
    ckpt = convert_file(model, folder / "rate.bnn.safetensors")
    x = torch.randn(48, 2)
    with torch.no_grad():
        y = net(x, 16000) + 0.05 * torch.randn(48, 1)
    save_file({"x": x, "y": y}, str(folder / "train.safetensors"))
    return net, model, ckpt, folder / "train.safetensors", x, y


def test_a_scripted_model_with_a_constant_argument_through_the_cli(rate_files, tmp_path):
    net, model, ckpt, data, x, _ = rate_files
    fitted = tmp_path / "rate.fit.safetensors"
    base = ["-m", model, "--model-arg", "sr=16000"]
    info = fit_json("fit", ckpt, *base, "-d", data, "--task", "regression", "--epochs", "2",
                    "--val-split", "0.25", "-o", fitted)  # fmt: skip
    assert info["model_args"] == {"sr": 16000} and info["inputs"] == ["x"]
    assert info["call"] == {"x": "input x", "sr": 16000}
    assert info["val_estimator"]["estimator"] == "weight_sampling"
    with safe_open(str(fitted), "pt") as handle:
        recorded = json.loads(handle.metadata()["bnnify.fit"])
    assert recorded["model_args"] == {"sr": 16000} and recorded["call"] == info["call"]

    out = tmp_path / "p.safetensors"
    summary = fit_json("predict", fitted, *base, "-i", data, "--mean-weights", "--batch-size",
                       "5", "-o", out)["summary"]  # fmt: skip
    assert summary["model_args"] == {"sr": 16000}
    with safe_open(str(out), "pt") as handle:
        mean = handle.get_tensor("mean")
        assert json.loads(handle.metadata()["bnnify.call"]) == {"sr": 16000, "x": "input x"}
    with torch.no_grad():
        at_16k, at_8k = net(x, 16000), net(x, 8000)
    # The fitted means moved little in 2 epochs; the constant changes the output far more.
    assert (mean - at_16k).abs().max() < 0.5 * (at_16k - at_8k).abs().max()

    missing = cli("predict", fitted, "-m", model, "-i", data)
    assert missing.exit_code == 2
    assert "needs 'sr'" in missing.stderr and "--model-arg sr=VALUE" in missing.stderr
    unknown = cli("predict", fitted, "-m", model, "-i", data, "--model-arg", "rate=1")
    assert unknown.exit_code == 2 and "no parameter 'rate'" in unknown.stderr


def test_a_scripted_model_with_a_constant_argument_through_the_api(rate_files, tmp_path):
    net, model, ckpt, _, x, y = rate_files
    fitted = bnnify.fit(ckpt, model, (x, y), task="regression", epochs=2,
                        model_args={"sr": 16000}, output=tmp_path / "f.safetensors")  # fmt: skip
    assert fitted.model_args == {"sr": 16000}
    result = bnnify.predict(fitted.output, model, x, model_args=["sr=8000"], mean_weights=True)
    with torch.no_grad():
        assert torch.allclose(result.tensors["mean"], net(x, 8000), atol=0.3)
    sampled = bnnify.predict(fitted.output, model, x, model_args={"sr": 16000}, samples=4)
    assert sampled.summary["estimator"]["estimator"] == "weight_sampling"
    assert (sampled.tensors["epistemic_std"] > 0).all()


@pytest.fixture(scope="module")
def masked_files(tmp_path_factory):
    """A state dict of `forward(x, mask)` with `arch`, its checkpoint and data."""
    folder = tmp_path_factory.mktemp("masked")
    torch.manual_seed(1)
    net = MaskedRegressor().eval()
    torch.save(net.state_dict(), folder / "masked.pt")
    spec = resolve_spec({"arch": "multi_input_models:masked_regressor"})
    ckpt = convert_file(folder / "masked.pt", folder / "masked.bnn.safetensors", spec=spec)
    x, mask = torch.randn(40, 3), (torch.rand(40, 1) > 0.5).float()
    with torch.no_grad():
        y = net(x, mask)
    save_file({"feats": x, "mask": mask, "y": y}, str(folder / "data.safetensors"))
    return net, folder / "masked.pt", ckpt, folder / "data.safetensors", x, mask, y


def test_a_module_with_two_inputs_through_arch_and_the_cli(masked_files, tmp_path):
    net, model, ckpt, data, x, mask, _ = masked_files
    base = ["-m", model, "--arch", "multi_input_models:masked_regressor",
            "--input-key", "x=feats", "--input-key", "mask"]  # fmt: skip
    fitted = tmp_path / "m.fit.safetensors"
    info = fit_json("fit", ckpt, *base, "-d", data, "--task", "regression", "--epochs", "2",
                    "--batch-size", "16", "-o", fitted)  # fmt: skip
    assert info["inputs"] == ["x", "mask"]
    assert info["call"] == {"x": "input x", "mask": "input mask"}
    out = tmp_path / "p.safetensors"
    mean = fit_json("predict", ckpt, *base, "-i", data, "--mean-weights", "--batch-size", "7",
                    "-o", out)  # fmt: skip
    assert mean["summary"]["examples"] == 40
    with safe_open(str(out), "pt") as handle:
        predicted = handle.get_tensor("mean")
    # Each batch of 7 got its own rows of both inputs: the unbatched model agrees.
    with torch.no_grad():
        assert torch.allclose(predicted, net(x, mask), atol=1e-6)
    sampled = fit_json("predict", fitted, *base, "-i", data, "--targets", data, "--samples", "4")
    assert sampled["summary"]["estimator"]["estimator"] == "weight_sampling"
    assert "2 inputs" in sampled["summary"]["estimator"]["reason"]
    assert set(sampled["metrics"]) == {"bayesian", "mean_weights"}
    one_input = cli("predict", fitted, "-m", model, "--arch", "multi_input_models:masked_regressor",
                    "-i", data, "--input-key", "feats")  # fmt: skip
    assert one_input.exit_code == 2 and "needs 'mask'" in one_input.stderr


def test_a_module_with_two_inputs_through_the_api(masked_files, tmp_path):
    _, model, ckpt, _, x, mask, y = masked_files
    inputs, arch = {"x": x, "mask": mask}, "multi_input_models:masked_regressor"
    fitted = bnnify.fit(ckpt, model, (inputs, y), task="regression", epochs=2, val_split=0.2,
                        arch=arch, output=tmp_path / "f.safetensors")  # fmt: skip
    assert fitted.inputs == ["x", "mask"] and fitted.n_val == 8
    result = bnnify.predict(fitted.output, model, inputs, targets=y, samples=6, arch=arch)
    assert result.tensors["mean"].shape == (40, 1)
    assert (result.tensors["epistemic_std"][mask.squeeze(1) > 0] > 0).all()
    # The mask switches off everything but the output bias: its spread alone remains
    # (the same for every example of a batch, which shares its weight samples).
    off = result.tensors["epistemic_std"][mask.squeeze(1) == 0]
    assert torch.allclose(off, off[0].expand_as(off), rtol=1e-5)
