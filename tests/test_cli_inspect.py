"""Tests of `bnnify inspect`: what a checkpoint holds, as tables or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import invoke
from model_files import shared_files

import bnnify
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.model_files import sha256_file


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return shared_files(tmp_path_factory)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def convert(models, *flags):
    result = invoke(
        "convert", models.path("cnn", "state_dict"), "-o", "cnn.bnn.safetensors", "--json", *flags
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def inspect_json(path):
    result = invoke("inspect", path, "--json", "--stats")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return json.loads(result.stdout)


def test_inspect_json_describes_the_checkpoint(models, tmp_path):
    convert(models, "--prior", "laplace", "--posterior-arg", "delta=0.2")
    info = inspect_json("cnn.bnn.safetensors")
    path = tmp_path / "cnn.bnn.safetensors"
    assert info["files"] == [str(Path("cnn.bnn.safetensors"))]
    assert info["bytes"] == path.stat().st_size
    assert (info["format"], info["format_version"]) == ("bnnify.variational", "1")
    assert info["bnnify_version"] == bnnify.__version__
    assert info["torch_version"] == torch.__version__
    source = models.path("cnn", "state_dict")
    assert info["source"] == {
        "name": source.name,
        "format": "state_dict",
        "sha256": sha256_file(source),
    }
    assert info["spec"]["prior"] == {"name": "laplace", "kwargs": {}}
    assert info["spec"]["posterior"] == {"name": "pretrained_gaussian", "kwargs": {"delta": 0.2}}
    assert info["fit"] is None
    assert info["variational_elements"] == 178
    assert info["deterministic"] == {
        "1.running_mean": {"kind": "unknown", "shape": [4], "dtype": "float32"},
        "1.running_var": {"kind": "unknown", "shape": [4], "dtype": "float32"},
        "1.num_batches_tracked": {"kind": "unknown", "shape": [], "dtype": "int64"},
    }
    params = dict(models.modules["cnn"].named_parameters())
    assert [row["name"] for row in info["parameters"]] == list(params)
    with Checkpoint(path) as ckpt:
        for row in info["parameters"]:
            weight = params[row["name"]]
            assert row["shape"] == list(weight.shape)
            assert row["elements"] == weight.numel()
            assert row["dtype"] == "float32"
            mu = ckpt.tensor(row["name"] + ".mu").double()
            sigma = F.softplus(ckpt.tensor(row["name"] + ".rho").double())
            assert row["sigma_mean"] == pytest.approx(float(sigma.mean()))
            assert row["sigma_min"] == pytest.approx(float(sigma.min()))
            assert row["sigma_max"] == pytest.approx(float(sigma.max()))
            assert row["sigma_min"] <= row["sigma_mean"] <= row["sigma_max"]
            snr = mu.abs() / sigma
            assert row["snr_mean"] == pytest.approx(float(snr.mean()))
            assert row["snr_median"] == pytest.approx(float(snr.reshape(-1).median()))
    # sigma = 0.2 |w|: the signal-to-noise ratio is 5 wherever |w| is above the floor.
    assert info["parameters"][0]["snr_median"] == pytest.approx(5.0, rel=1e-4)


def test_inspect_a_sharded_checkpoint(models, tmp_path):
    made = convert(models, "--shard-size", "500B")
    index = made["outputs"][-2]
    info = inspect_json(index)
    shards = sorted(str(p.name) for p in tmp_path.glob("cnn.bnn-*.safetensors"))
    assert len(shards) > 1
    assert sorted(Path(f).name for f in info["files"]) == sorted([*shards, Path(index).name])
    assert info["bytes"] == sum(Path(f).stat().st_size for f in info["files"])
    assert info["variational_elements"] == 178


def test_inspect_tables(models):
    convert(models)
    result = invoke("inspect", "cnn.bnn.safetensors", "--top", "2", "--stats")
    assert result.exit_code == 0
    out = result.stdout
    assert "Checkpoint" in out and "bnnify.variational v1" in out
    assert "pretrained_gaussian delta=0.1" in out
    assert "Parameters (2 of 6)" in out
    for column in ("sigma mean", "sigma min", "sigma max", "|mu|/sigma median"):
        assert column in out
    assert " 0.weight " in out and " 4.bias " not in out
    assert "Parameters (6 of 6)" in invoke("inspect", "cnn.bnn.safetensors", "--top", "0").stdout
    quiet = invoke("inspect", "cnn.bnn.safetensors", "-q")
    assert (quiet.exit_code, quiet.stdout, quiet.stderr) == (0, "", "")


def test_inspect_refuses_what_is_not_a_checkpoint(models, tmp_path):
    convert(models)
    for path, fragment in (
        ("missing.safetensors", "does not exist"),
        ("cnn.kl.safetensors", "is not a bnnify checkpoint"),
        (str(models.path("cnn", "safetensors")), "is not a bnnify checkpoint"),
    ):
        result = invoke("inspect", path)
        assert result.exit_code == 1
        assert fragment in " ".join(result.stderr.split())
        assert result.stdout == ""
