"""The state dict inside a checkpoint dict: found in common layouts, chosen with --key."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict

import pytest
import torch
from cli_helpers import invoke
from safetensors.torch import save_file
from torch import nn

from bnnify.demo import build_model
from bnnify.errors import FormatError, UnknownNameError, UsageError
from bnnify.formats.model_files import load_model
from bnnify.formats.nesting import find_state_dict

ARCH = ["--arch", "bnnify.demo:build_model", "--arch-kwargs", "{}"]


def state(seed: int = 0) -> OrderedDict:
    torch.manual_seed(seed)
    return build_model().state_dict()


def optimizer_state(module: nn.Module) -> dict:
    optimizer = torch.optim.Adam(module.parameters())
    module(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


@pytest.mark.parametrize(
    ("layout", "key"),
    [
        (lambda s: {"step": 3, "model_state": s, "optimizer_state": {}}, "model_state"),
        (lambda s: {"model": {"state_dict": s, "model_args": {"hidden": 32}}}, "model.state_dict"),
        (lambda s: {"epoch": 5, "state_dict": s, "hyper_parameters": {"lr": 0.1}}, "state_dict"),
        (lambda s: {"net": s, "epoch": 2}, "net"),
    ],
    ids=["model_state", "two_levels", "lightning", "net"],
)
def test_common_layouts_are_found_and_the_key_recorded(tmp_path, layout, key):
    reference = state()
    torch.save(layout(reference), tmp_path / "ckpt.pt")
    with load_model(tmp_path / "ckpt.pt") as loaded:
        assert loaded.key == key and loaded.prefix is None
        assert loaded.names() == list(reference)
        for name, tensor in reference.items():
            assert torch.equal(loaded.tensor(name), tensor)


def test_the_optimizer_state_beside_the_model_is_not_a_candidate(tmp_path):
    module = build_model()
    content = {"model_state": module.state_dict(), "optimizer_state": optimizer_state(module)}
    content["scheduler"] = {"state": {"last": torch.ones(1)}}
    content["callbacks"] = {"EarlyStopping": {"best_score": torch.tensor(0.5)}}
    torch.save(content, tmp_path / "ckpt.pt")
    with load_model(tmp_path / "ckpt.pt") as loaded:
        assert loaded.key == "model_state"


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_a_wrapper_prefix_on_every_name_is_removed_and_recorded(tmp_path, prefix):
    reference = state()
    torch.save({"state_dict": {prefix + k: v for k, v in reference.items()}}, tmp_path / "c.pt")
    with load_model(tmp_path / "c.pt") as loaded:
        assert loaded.names() == list(reference) and loaded.prefix == prefix


def test_a_prefix_on_some_names_only_is_kept(tmp_path):
    content = {"module.a": torch.ones(2), "b": torch.ones(2)}
    torch.save(content, tmp_path / "c.pt")
    with load_model(tmp_path / "c.pt") as loaded:
        assert loaded.names() == ["module.a", "b"] and loaded.prefix is None


def test_several_candidates_are_refused_with_the_list_and_key_chooses(tmp_path):
    model, ema = state(0), state(1)
    torch.save({"model": model, "ema": ema, "step": 10}, tmp_path / "c.pt")
    with pytest.raises(FormatError) as error:
        load_model(tmp_path / "c.pt")
    assert "2 state dicts" in error.value.message
    assert (
        "'model' (9 tensors)" in error.value.message and "'ema' (9 tensors)" in error.value.message
    )
    assert "--key" in error.value.hint
    with load_model(tmp_path / "c.pt", key="ema") as loaded:
        assert loaded.key == "ema"
        assert torch.equal(loaded.tensor("0.weight"), ema["0.weight"])


def test_a_key_naming_nothing_lists_what_there_is(tmp_path):
    torch.save({"model": {"state_dict": state()}}, tmp_path / "c.pt")
    with pytest.raises(UnknownNameError, match=r"no key 'stat_dict' under 'model'.*'state_dict'"):
        load_model(tmp_path / "c.pt", key="model.stat_dict")
    with pytest.raises(FormatError, match="holds a dict without tensors"):
        load_model(tmp_path / "c.pt", key="model")


def test_a_key_may_hold_dots(tmp_path):
    torch.save({"model.v2": {"weights": state()}}, tmp_path / "c.pt")
    with load_model(tmp_path / "c.pt", key="model.v2.weights") as loaded:
        assert loaded.key == "model.v2.weights" and len(loaded) == 9


def test_tensors_at_the_top_level_win_with_a_warning_about_the_others(tmp_path, caplog):
    torch.save({"epoch": torch.tensor(3), "model": state()}, tmp_path / "c.pt")
    with caplog.at_level(logging.WARNING, "bnnify"), load_model(tmp_path / "c.pt") as loaded:
        assert loaded.names() == ["epoch"] and loaded.key is None
    assert "'model'" in caplog.text and "--key" in caplog.text


def test_nothing_to_find_is_refused(tmp_path):
    torch.save({"step": 1, "optimizer": optimizer_state(build_model())}, tmp_path / "c.pt")
    with pytest.raises(FormatError, match=r"holds no state dict.*'step', 'optimizer'"):
        load_model(tmp_path / "c.pt")


def test_key_is_refused_for_other_formats(tmp_path):
    save_file(state(), str(tmp_path / "m.safetensors"))
    with pytest.raises(UsageError, match=r"--key 'model'.*safetensors"):
        load_model(tmp_path / "m.safetensors", key="model")


def test_find_state_dict_never_goes_deeper_than_its_limit():
    deep = {"a": {"b": {"c": {"d": {"e": {"w": torch.ones(1)}}}}}}
    with pytest.raises(FormatError, match="no state dict"):
        find_state_dict(deep, "x")
    assert find_state_dict(deep, "x", key="a.b.c.d.e").key == "a.b.c.d.e"


# ------------------------------------------------------------------ command line


def test_convert_finds_a_nested_state_dict_and_records_its_key(tmp_path):
    torch.save({"model": {"state_dict": state()}, "optimizer": {}}, tmp_path / "c.pt")
    result = invoke("convert", tmp_path / "c.pt", "-o", tmp_path / "c.bnn.safetensors", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["source"]["key"] == "model.state_dict"
    assert (data["reparametrized"], len(data["deterministic"])) == (6, 3)  # BatchNorm statistics
    human = invoke("convert", tmp_path / "c.pt", "-o", tmp_path / "d.bnn.safetensors")
    assert "the state dict under 'model.state_dict'" in human.stderr


def test_convert_refuses_two_candidates_and_fit_predict_reuse_the_chosen_key(tmp_path):
    torch.manual_seed(0)
    model, ema = build_model().eval(), build_model().eval()
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, tmp_path / "c.pt")
    refused = invoke("convert", tmp_path / "c.pt", "--json")
    assert refused.exit_code == 1 and "--key" in refused.stderr
    spec = tmp_path / "spec.yaml"
    spec.write_text('arch: "bnnify.demo:build_model"\n')
    ckpt = tmp_path / "c.bnn.safetensors"
    converted = invoke(
        "convert", tmp_path / "c.pt", "--key", "ema", "-c", spec, *ARCH, "-o", ckpt, "--json"
    )
    assert converted.exit_code == 0, converted.output
    assert json.loads(converted.stdout)["source"]["key"] == "ema"
    x = torch.randn(6, 8)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    predicted = invoke(
        "predict", ckpt, "--model", tmp_path / "c.pt", "--input", tmp_path / "x.safetensors",
        "--mean-weights", "--out", tmp_path / "p.safetensors", *ARCH, "--json",
    )  # fmt: skip
    assert predicted.exit_code == 0, predicted.output
    from safetensors.torch import load_file

    with torch.no_grad():
        expected = ema(x)
    torch.testing.assert_close(load_file(str(tmp_path / "p.safetensors"))["mean"], expected)


def test_convert_key_naming_nothing_is_a_usage_error(tmp_path):
    torch.save({"model": state()}, tmp_path / "c.pt")
    result = invoke("convert", tmp_path / "c.pt", "--key", "modle", "--json")
    assert result.exit_code == 2
    assert "Did you mean 'model'" in result.stderr
