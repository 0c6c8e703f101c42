"""Tests of bnnify.demo: the demo model converts with every sample spec."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bnnify.cli.main import app
from bnnify.demo import build_model, main, synthetic_regression
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.spec import read_spec

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

SAMPLES = Path(__file__).resolve().parent.parent / "sample_configs"
SPECS = sorted(p.name for p in SAMPLES.glob("*.yaml"))
runner = CliRunner()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`python -m bnnify.demo OUT.pt`, run once: the TorchScript model and its state dict."""
    folder = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    # Tiny matrices: one thread is many times faster than two on a busy machine.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script/save
            main([str(folder / "out" / "model.pt")])
    finally:
        torch.set_num_threads(threads)
    return folder / "out" / "model.pt", folder / "out" / "model.state_dict.pt"


def test_the_demo_writes_a_trained_model(demo):
    script, state = demo
    assert script.is_file() and state.is_file()
    model = torch.jit.load(str(script))
    reference = build_model()
    reference.load_state_dict(torch.load(state, weights_only=True))
    reference.eval()
    x, y = synthetic_regression(64, seed=5)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
        # Trained: far better than predicting the mean.
        assert torch.nn.functional.mse_loss(reference(x), y) < 0.5 * y.var()


def test_the_sample_configs_are_all_tested():
    assert SPECS == [
        "gaussian.yaml",
        "partial.yaml",
        "partial_by_kind.yaml",
        "pretrained_moped.yaml",
        "scale_mixture.yaml",
        "state_dict_arch.yaml",
    ]


@pytest.mark.parametrize("name", SPECS)
def test_every_sample_config_converts_the_demo(demo, tmp_path, name):
    script, state = demo
    spec = read_spec(SAMPLES / name)
    model = state if spec.arch else script
    result = runner.invoke(
        app,
        [
            "convert",
            str(model),
            "--spec",
            str(SAMPLES / name),
            "-o",
            str(tmp_path / "m.bnn.safetensors"),
            "--report",
            str(tmp_path / "m.kl.safetensors"),
            "--json",
            *(
                ["--arch", spec.arch, "--arch-kwargs", json.dumps(spec.arch_kwargs)]
                * bool(spec.arch)
            ),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["spec"] == spec.to_json()
    assert data["kl"]["sum"] > 0
    expected_method = "monte_carlo" if spec.prior[0] == "scale_mixture" else "analytic"
    assert data["kl"]["method"] == expected_method
    with Checkpoint(tmp_path / "m.bnn.safetensors") as ckpt:
        assert ckpt.spec == spec
        bnn = ckpt.to_bayesian(build_model())
        with torch.no_grad():
            assert bnn(torch.randn(5, 8)).shape == (5, 1)
    if name == "partial.yaml":
        # By name: the demo's BatchNorm is called "1", so its weight is not caught.
        assert [p["name"] for p in data["parameters"]] == ["0.weight", "1.weight", "3.weight"]
    elif name == "partial_by_kind.yaml":
        # By kind: only the Linear layers' weights, whatever the BatchNorm is called.
        assert [p["name"] for p in data["parameters"]] == ["0.weight", "3.weight"]
    else:
        assert data["reparametrized"] == 6
