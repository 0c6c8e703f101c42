"""Tests of `bnnify kl`: the KL of a checkpoint or a report, checked against the library."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import BNNIFY, flat, invoke
from model_files import build_cnn, shared_files

from bnnify.cli.schemas import SCHEMAS
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.safetensors_io import load_file, read_header, save_file


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return shared_files(tmp_path_factory)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def convert(models, *flags, model="cnn", name="c"):
    """`bnnify convert` of the CNN state dict; returns its JSON summary."""
    result = invoke(
        "convert",
        models.path(model, "state_dict"),
        "-o",
        f"{name}.bnn.safetensors",
        "--report",
        f"{name}.kl.safetensors",
        "--json",
        *flags,
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def kl_json(*args):
    result = invoke("kl", *args, "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return json.loads(result.stdout)


def library_kl(checkpoint, prior=None, architecture=None) -> float:
    with Checkpoint(checkpoint) as ckpt, torch.no_grad():
        return float(ckpt.to_bayesian(architecture, prior=prior).kl_divergence())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("prior", ["gaussian", "laplace", "empirical_gaussian"])
@pytest.mark.parametrize("posterior", ["gaussian", "pretrained_gaussian"])
def test_the_kl_matches_the_library(models, posterior, prior, dtype):
    made = convert(models, "--posterior", posterior, "--prior", prior, "--dtype", dtype)
    data = kl_json("c.bnn.safetensors")
    assert data["reduction"] == "sum"
    assert data["value"] == data["kl"]["sum"] == kl_json("c.kl.safetensors")["value"]
    assert data["value"] == pytest.approx(made["kl"]["sum"], rel=1e-12)
    assert data["elements"] == made["variational_elements"] == 178
    assert (data["kl"]["method"], data["kl"]["samples"]) == ("analytic", None)
    assert data["prior"]["name"] == prior and data["posterior"]["name"] == posterior
    assert [p["kl"] for p in data["parameters"]] == [p["kl"] for p in made["parameters"]]
    rel = 1e-10 if dtype == "float64" else 1e-5
    architecture = build_cnn().to(getattr(torch, dtype))
    assert library_kl("c.bnn.safetensors", architecture=architecture) == pytest.approx(
        data["value"], rel=rel
    )
    assert library_kl("c.bnn.safetensors") == pytest.approx(data["value"], rel=rel)


def test_the_mean_reduction(models):
    convert(models)
    data = kl_json("c.bnn.safetensors", "--reduction", "mean")
    assert data["reduction"] == "mean"
    assert data["value"] == pytest.approx(data["kl"]["sum"] / data["elements"], rel=1e-12)
    assert data["value"] == data["kl"]["mean"]
    human = invoke("kl", "c.bnn.safetensors", "--reduction", "mean")
    assert f"KL (mean): {data['value']:.8g}" in human.stdout
    assert invoke("kl", "c.bnn.safetensors", "--reduction", "median").exit_code == 2


def test_top_limits_the_table_to_the_largest(models):
    convert(models)
    data = kl_json("c.bnn.safetensors")
    ranked = [p["name"] for p in sorted(data["parameters"], key=lambda p: -p["kl"])]
    result = invoke("kl", "c.bnn.safetensors", "--top", "2")
    assert result.exit_code == 0
    assert "largest 2 of 6" in result.stdout
    shown = [n for n in ranked if any(f" {n} " in line for line in result.stdout.splitlines())]
    assert shown == ranked[:2]
    everything = invoke("kl", "c.bnn.safetensors", "--top", "0").stdout
    assert "largest 6 of 6" in everything
    assert f"KL (sum): {data['value']:.8g}" in everything
    # The JSON lists every parameter in storage order, or with --top the largest, sorted.
    assert [p["name"] for p in kl_json("c.bnn.safetensors", "--top", "2")["parameters"]] == (
        ranked[:2]
    )
    assert len(data["parameters"]) == data["parameter_count"] == 6


def test_a_prior_override_matches_the_library(models):
    convert(models)
    data = kl_json("c.bnn.safetensors", "--prior", "laplace", "--prior-arg", "scale=0.5")
    assert data["prior"] == {"name": "laplace", "kwargs": {"scale": 0.5}}
    expected = library_kl("c.bnn.safetensors", prior=("laplace", {"scale": 0.5}))
    assert data["value"] == pytest.approx(expected, rel=1e-5)
    # Arguments alone change the recorded prior.
    data = kl_json("c.bnn.safetensors", "--prior-arg", "sigma=0.5")
    assert data["prior"] == {"name": "gaussian", "kwargs": {"sigma": 0.5}}
    expected = library_kl("c.bnn.safetensors", prior=("gaussian", {"sigma": 0.5}))
    assert data["value"] == pytest.approx(expected, rel=1e-5)


def test_monte_carlo_is_within_a_few_standard_errors(models):
    convert(models, "--posterior", "gaussian")
    exact = kl_json("c.bnn.safetensors")["value"]
    samples = 32
    data = kl_json("c.bnn.safetensors", "--mc-samples", str(samples))
    assert (data["kl"]["method"], data["kl"]["samples"]) == ("monte_carlo", samples)
    variance = 0.0
    with Checkpoint("c.bnn.safetensors") as ckpt:
        for name in ckpt.parameters:
            mu = ckpt.tensor(f"{name}.mu").double()
            q = torch.distributions.Normal(mu, F.softplus(ckpt.tensor(f"{name}.rho").double()))
            w = q.sample((2000,))
            ratio = q.log_prob(w) - torch.distributions.Normal(0.0, 1.0).log_prob(w)
            variance += float(ratio.var(dim=0).sum())
    error = math.sqrt(variance / samples)
    assert data["value"] != exact
    assert abs(data["value"] - exact) < 5 * error


def test_the_scale_mixture_report_is_reproduced(models):
    made = convert(models, "--prior", "scale_mixture")
    assert (made["kl"]["method"], made["kl"]["samples"]) == ("monte_carlo", 16)
    from_checkpoint = kl_json("c.bnn.safetensors")
    from_report = kl_json("c.kl.safetensors")
    for data in (from_checkpoint, from_report):
        del data["path"], data["from_report"]
    assert from_checkpoint == from_report
    assert from_checkpoint["value"] == pytest.approx(made["kl"]["sum"], rel=1e-12)
    assert [p["kl"] for p in from_checkpoint["parameters"]] == [p["kl"] for p in made["parameters"]]
    other = kl_json("c.bnn.safetensors", "--seed", "1")
    assert other["value"] != made["kl"]["sum"]
    assert other["value"] == pytest.approx(made["kl"]["sum"], rel=0.05)


def test_out_writes_a_report_shown_identically(models, tmp_path):
    convert(models, "--prior", "laplace")
    computed = kl_json("c.bnn.safetensors", "--prior-arg", "scale=2", "--out", "r.kl.safetensors")
    assert computed["prior"] == {"name": "laplace", "kwargs": {"scale": 2}}
    shown = kl_json("r.kl.safetensors")
    assert (shown["from_report"], computed["from_report"]) == (True, False)
    assert computed["output"] == shown["path"] == "r.kl.safetensors"
    same_keys = set(SCHEMAS["kl"]) - {"path", "from_report", "output"}
    assert {k: shown[k] for k in same_keys} == {k: computed[k] for k in same_keys}
    assert kl_json("r.kl.safetensors", "--reduction", "mean")["value"] == computed["kl"]["mean"]
    before = Path("r.kl.safetensors").read_bytes()
    refused = invoke("kl", "c.bnn.safetensors", "--out", "r.kl.safetensors")
    assert refused.exit_code == 2 and "--force" in flat(refused.stderr)
    assert Path("r.kl.safetensors").read_bytes() == before
    assert invoke("kl", "c.bnn.safetensors", "--out", "r.kl.safetensors", "-f").exit_code == 0
    assert kl_json("r.kl.safetensors")["prior"]["kwargs"] == {}
    same = invoke("kl", "c.bnn.safetensors", "--out", "c.bnn.safetensors", "-f")
    assert same.exit_code == 2 and "would overwrite the input" in flat(same.stderr)
    # Options that only apply to checkpoints are refused for a report (usage error).
    for flags in (["--prior", "laplace"], ["--mc-samples", "4"], ["--seed", "0"]):
        refused = invoke("kl", "r.kl.safetensors", *flags)
        assert refused.exit_code == 2 and refused.stdout == ""
        assert f"is a KL report: {flags[0]} apply to a checkpoint only" in flat(refused.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "c.bnn.safetensors",
        "c.kl.safetensors",
        "r.kl.safetensors",
    ]


def test_a_sharded_checkpoint(models):
    made = convert(models, "--shard-size", "500B")
    index = made["outputs"][-2]
    assert index.endswith(".index.json")
    assert kl_json(index)["value"] == kl_json("c.kl.safetensors")["value"]


def test_the_output_modes(models):
    convert(models)
    quiet = invoke("kl", "c.bnn.safetensors", "-q")
    assert (quiet.exit_code, quiet.stdout, quiet.stderr) == (0, "", "")
    human = invoke("kl", "c.bnn.safetensors")
    assert "KL by parameter" in human.stdout and "KL (sum):" in human.stdout
    assert "[gaussian prior, analytic, 178 elements]" in flat(human.stdout)


def test_errors(models, tmp_path):
    convert(models)
    metadata, _ = read_header("c.bnn.safetensors")
    save_file(
        load_file("c.bnn.safetensors"),
        tmp_path / "v9.safetensors",
        {**metadata, "bnnify.format_version": "9"},
    )
    save_file({"w": torch.ones(2)}, tmp_path / "plain.safetensors")
    cases = [
        (["missing.safetensors"], 1, "does not exist"),
        (["plain.safetensors"], 1, "is not a bnnify checkpoint"),
        (["v9.safetensors"], 1, "format version '9' is not supported"),
        (["c.bnn.safetensors", "--prior", "empirical_gaussian"], 2, "original weights"),
        (["c.bnn.safetensors", "--prior", "laplaze"], 2, "Did you mean 'laplace'?"),
        (["c.bnn.safetensors", "--prior-arg", "scale=1"], 2, "scale"),
        (["c.bnn.safetensors", "--device", "cuda"], 2, "'cuda' is not available"),
        (["c.bnn.safetensors", "--mc-samples", "0"], 2, "--mc-samples"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, code, fragment in cases:
        result = invoke("kl", *args, "--out", "x.kl.safetensors")
        assert result.exit_code == code, (args, result.output)
        assert fragment in flat(result.stderr), (args, result.stderr)
        assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.skipif(not BNNIFY.exists(), reason="the bnnify console script is not installed")
def test_the_console_script(models, tmp_path):
    convert(models, "--prior", "scale_mixture")
    expected = kl_json("c.bnn.safetensors", "--reduction", "mean")
    done = subprocess.run(
        [str(BNNIFY), "kl", "c.bnn.safetensors", "--json", "--reduction", "mean"],
        cwd=tmp_path,
        env={**os.environ, "NO_COLOR": "1"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == expected
