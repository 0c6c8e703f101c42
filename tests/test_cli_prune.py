"""Tests of `bnnify prune` through the real entry point: JSON, metrics, exit codes."""

from __future__ import annotations

import json

import pytest
from cli_helpers import flat
from fit_files import cli, shared_fit_files, single_thread

from bnnify.cli.schemas import SCHEMAS
from bnnify.formats.checkpoint import Checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

PRUNE_KEYS = set(SCHEMAS["prune"])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return shared_fit_files(tmp_path_factory)


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with single_thread():
        yield


def strict_json(text: str) -> dict:
    def refuse(value):
        raise ValueError(f"non-JSON constant {value}")

    return json.loads(text, parse_constant=refuse)


def test_json_follows_the_schema_with_metrics_before_and_after(files, tmp_path):
    out = tmp_path / "p.safetensors"
    args = ["prune", files.cls_fitted, "-m", files.cls_model, "--keep", "0.25"]
    result = cli(*args, "-d", files.cls_test, "--samples", "4", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    data = strict_json(result.stdout)
    assert set(data) == PRUNE_KEYS and data["schema"] == "bnnify.prune/1"
    assert (data["kind"], data["method"], data["scope"], data["export"]) == (
        "checkpoint",
        "keep",
        "global",
        None,
    )
    assert data["output"] == str(out) and Checkpoint(out).parameters
    assert data["removed"] == sum(p["removed"] for p in data["parameters"])
    assert set(data["metrics"]) == {"before", "after"}
    for stage in data["metrics"].values():
        assert set(stage) == {"bayesian", "mean_weights"}
        assert {"accuracy", "nll", "ece"} <= set(stage["bayesian"])


def test_export_writes_a_plain_model_and_nests_its_json(files, tmp_path):
    out = tmp_path / "p.pt"
    args = ["prune", files.reg_fitted, "-m", files.reg_model, "--snr-threshold", "1.5"]
    result = cli(
        *args, "--export", "--weights", "ensemble:3", "-d", files.reg_train, "-o", out, "--json"
    )
    assert result.exit_code == 0, result.output
    data = strict_json(result.stdout)
    assert data["kind"] == "model" and data["export"]["schema"] == "bnnify.export/1"
    assert data["export"]["format"] == "torchscript" and out.is_file()
    assert data["export"]["check"]["max_abs_diff"] <= 1e-6


def test_human_summary(files, tmp_path):
    out = tmp_path / "p.safetensors"
    args = [
        "prune",
        files.reg_fitted,
        "-m",
        files.reg_model,
        "--keep",
        "0.5",
        "-d",
        files.reg_train,
    ]
    result = cli(*args, "-o", out)
    assert result.exit_code == 0, result.output
    text = flat(result.stdout)
    assert "Pruned 576 of 1,153 Bayesian weights (50.0%, keep 0.5, global)" in text
    assert "before bayesian: rmse" in text and "after mean weights: rmse" in text
    assert f"wrote {out}" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "exactly one of --keep"),
        (["--keep", "0.5", "--snr-threshold", "1"], "exactly one of --keep"),
        (["--keep", "1.5"], "Invalid value for '--keep'"),
        (["--snr-threshold", "1", "--scope", "layer"], "--scope layer"),
        (["--keep", "0.5", "-d", "{train}"], "--data needs the model"),
        (["--keep", "0.5", "-o", "{ckpt}", "--force"], "input"),
    ],
)
def test_usage_errors_exit_2(files, tmp_path, extra, message):
    names = {"{train}": str(files.reg_train), "{ckpt}": str(files.reg_fitted)}
    extra = [names.get(a, a) for a in extra]
    if "-o" not in extra:
        extra += ["-o", str(tmp_path / "p.safetensors")]
    result = cli("prune", files.reg_fitted, *extra)
    assert result.exit_code == 2, result.output
    assert message in flat(result.output)
    assert not (tmp_path / "p.safetensors").exists()
