"""`torchrun --nproc_per_node=2 -m bnnify fit` on the CPU (gloo) against one process.

Each rank trains on its half of every batch with its own weight noise, and
DistributedDataParallel averages the gradients: with equal halves, the average of the
two halves' mean losses is the whole batch's mean loss, so the gradient is the
single-process gradient up to the weight noise. The test makes that noise negligible
(posterior sigma 1e-6, so a weight sample differs from the mean by ~1e-6 relative):
the two runs then follow the same trajectory (smooth tanh units: no ReLU kink for a
1e-6 perturbation to cross), and their fitted means must agree to 1e-3 of the distance
the fit moved them (measured: ~1e-5). That fails if the gradients were not averaged:
training on batches of half the size moves the means ~0.96 of that distance away from
the single-process fit, and another data order (--seed 1) ~0.08.
"""

from __future__ import annotations

import math
import socket
import subprocess
import sys

import pytest
import torch
from fit_files import (
    argv,
    cli,
    fit_output,
    save_script,
    single_thread,
    subprocess_env,
    toy_regression,
)
from safetensors.torch import load_file, save_file
from torch import nn

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="torch.distributed with the gloo backend is not available in this torch build",
    ),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distance(a: dict, b: dict) -> float:
    """||mu_a - mu_b|| over every posterior mean."""
    keys = [k for k in a if k.endswith(".mu")]
    return sum(float((a[k] - b[k]).square().sum()) for k in keys) ** 0.5


def test_two_processes_fit_like_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # both runs read the same relative paths
    with torch.random.fork_rng(devices=[]), single_thread():
        torch.manual_seed(0)
        # Untrained: the fit moves the means far, so agreement is not trivial.
        net = nn.Sequential(
            nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
        )
        save_script(net.eval(), tmp_path / "net.pt")
        x, y = toy_regression(512, seed=0)
        save_file({"x": x, "y": y}, str(tmp_path / "train.safetensors"))
        xv, yv = toy_regression(128, seed=1)
        save_file({"x": xv, "y": yv}, str(tmp_path / "val.safetensors"))
        converted = cli("convert", tmp_path / "net.pt", "--posterior-arg", "sigma=1e-6")
        assert converted.exit_code == 0, converted.output
        template = "fit net.bnn.safetensors -m net.pt -d train.safetensors --task regression"
        options = "--epochs 8 --lr 0.01 --batch-size 128 --mc-samples 2 --val val.safetensors"
        args = [*argv(template), *argv(options), "--json"]
        single = cli(*args, "-o", tmp_path / "single.safetensors")
        assert single.exit_code == 0, single.output

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command = [*torchrun, "-m", "bnnify", *args, "-o", "distributed.safetensors"]
    process = subprocess.run(
        command,
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert "Traceback" not in process.stderr
    # Only rank 0 prints (its JSON Lines) and writes: without --force, a second
    # writer would find the first one's file in place when it commits, and fail.
    info = fit_output(process.stdout)
    expected = ["net.pt", "net.bnn.safetensors", "net.kl.safetensors", "train.safetensors"]
    expected += ["val.safetensors", "single.safetensors", "distributed.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
    reference = fit_output(single.stdout)
    assert len(info["history"]) == 8 and info["n_train"] == 512

    one = load_file(str(tmp_path / "single.safetensors"))
    two = load_file(str(tmp_path / "distributed.safetensors"))
    start = load_file(str(tmp_path / "net.bnn.safetensors"))
    assert one.keys() == two.keys()
    moved = distance(one, start)
    assert moved > 0.2 * distance(start, {k: 0 * v for k, v in start.items()})
    assert distance(one, two) < 1e-3 * moved
    noise = one["bnnify.fit.log_noise"].exp(), two["bnnify.fit.log_noise"].exp()
    assert float(noise[1]) == pytest.approx(float(noise[0]), rel=1e-3)
    for key in ("rmse", "log_likelihood"):
        assert info["final"]["val"][key] == pytest.approx(reference["final"]["val"][key], rel=1e-2)


def test_a_last_batch_smaller_than_the_process_count(tmp_path, monkeypatch):
    # 129 examples in batches of 128: the last batch holds one example for two processes.
    monkeypatch.chdir(tmp_path)
    with torch.random.fork_rng(devices=[]), single_thread():
        torch.manual_seed(0)
        save_script(nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 2)), tmp_path / "n.pt")
        x, y = toy_regression(129, seed=0)
        labels = (y[:, 0] > 0).long()
        save_file({"x": x, "y": labels}, str(tmp_path / "train.safetensors"))
        assert cli("convert", tmp_path / "n.pt").exit_code == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    fit = "fit n.bnn.safetensors -m n.pt -d train.safetensors --task classification"
    command = [*torchrun, "-m", "bnnify", *argv(fit), "--epochs", "2", "--json"]
    process = subprocess.run(
        command,
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    final = fit_output(process.stdout)["final"]
    assert all(math.isfinite(final[k]) for k in ("loss", "nll", "kl"))
    fitted = load_file(str(tmp_path / "n.bnn.fit.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in fitted.values() if t.is_floating_point())
