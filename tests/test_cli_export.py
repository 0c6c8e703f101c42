"""Tests of `bnnify export` through the real entry point: JSON, exit codes, outputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import flat
from fit_files import cli, shared_fit_files, single_thread

from bnnify.cli.schemas import SCHEMAS

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

EXPORT_KEYS = set(SCHEMAS["export"])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return shared_fit_files(tmp_path_factory)


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written to the working directory
    with single_thread():
        yield


def strict_json(text: str) -> dict:
    """`json.loads` refusing NaN and Infinity, which are not JSON."""

    def refuse(value):
        raise ValueError(f"non-JSON constant {value}")

    return json.loads(text, parse_constant=refuse)


def test_json_follows_the_schema(files, tmp_path):
    out = tmp_path / "ens.pt"
    args = ["export", files.reg_fitted, "-m", files.reg_model, "--weights", "ensemble:4"]
    result = cli(*args, "--seed", "2", "-i", files.reg_train, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    data = strict_json(result.stdout)
    assert set(data) == EXPORT_KEYS and data["schema"] == "bnnify.export/1"
    assert data["output"] == str(out) and out.is_file() and data["bytes"] == out.stat().st_size
    assert (data["format"], data["weights"], data["samples"], data["seed"]) == (
        "torchscript",
        "ensemble",
        4,
        2,
    )
    assert data["outputs"] == ["mean", "std"] and data["batching"] == "loop"
    assert data["check"]["kind"] == "outputs" and data["check"]["max_abs_diff"] <= 1e-6
    assert data["source"]["name"] == files.reg_model.name
    assert result.stderr == ""


def test_human_summary_and_quiet(files, tmp_path):
    out = tmp_path / "m.safetensors"
    args = ["export", files.reg_fitted, "-m", files.reg_model, "--format", "safetensors"]
    result = cli(*args, "-o", out)
    assert result.exit_code == 0, result.output
    text = flat(result.stdout)
    assert "Exported posterior means of toy.fit.safetensors as safetensors" in text
    assert f"wrote {out}" in text
    quiet = cli(*args, "-o", tmp_path / "q.safetensors", "-q")
    assert quiet.exit_code == 0 and quiet.output == ""
    assert (tmp_path / "q.safetensors").is_file()


def test_the_default_output_lies_beside_the_checkpoint(files, tmp_path):
    for name in ("reg_fitted", "reg_model"):
        shutil.copy(getattr(files, name), tmp_path / getattr(files, name).name)
    ckpt, model = tmp_path / files.reg_fitted.name, tmp_path / files.reg_model.name
    result = cli("export", ckpt, "-m", model, "--format", "state_dict", "--weights", "sample")
    assert result.exit_code == 0, result.output
    written = tmp_path / "toy.fit.sample-seed0.state_dict.pt"
    assert written.is_file()
    assert set(torch.load(written, weights_only=True)) >= {"0.weight", "4.bias"}
    again = cli("export", ckpt, "-m", model, "--format", "state_dict", "--weights", "sample")
    assert again.exit_code == 2 and "--force" in flat(again.stderr)


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--weights", "ensemble:3", "--format", "safetensors"], 2, "an ensemble cannot be"),
        (["--format", "export", "-i", "{train}"], 2, "cannot become a torch.export program"),
        ([], 2, "needs example inputs"),
        (["--weights", "ensemble"], 2, "invalid weights"),
        (["--format", "onnx"], 2, "onnx"),
        (["--aleatoric", "-i", "{train}"], 2, "aleatoric applies"),
        (["-o", "{model}", "--force", "--format", "state_dict"], 2, "input"),
    ],
)
def test_errors_exit_with_their_code_and_a_hint(files, tmp_path, extra, code, message):
    extra = [
        str(files.reg_train) if a == "{train}" else str(files.reg_model) if a == "{model}" else a
        for a in extra
    ]
    if "-o" not in extra:
        extra += ["-o", str(tmp_path / "out.pt")]
    result = cli("export", files.reg_fitted, "-m", files.reg_model, *extra)
    assert result.exit_code == code, result.output
    assert message in flat(result.stderr)
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.pt").exists()


def test_a_model_that_is_not_the_checkpoints_exits_1(files, tmp_path):
    out = tmp_path / "m.pt"
    result = cli(
        "export", files.reg_fitted, "-m", files.cls_model, "--format", "state_dict", "-o", out
    )
    assert result.exit_code == 1 and "does not match the checkpoint" in flat(result.stderr)
    assert not out.exists()
