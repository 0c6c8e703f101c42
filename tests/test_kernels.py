"""Tests of the choice between compiled and eager kernels, and of the fallback."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from bnnify.bnn import BayesianModule, fused, kernels

CPU = torch.device("cpu")
needs_compiler = pytest.mark.skipif(
    kernels.compile_refusal(CPU) is not None,
    reason=f"torch.compile unavailable: {kernels.compile_refusal(CPU)}",
)


@pytest.fixture(autouse=True)
def _fresh_kernel_state(monkeypatch):
    """Each test sees no earlier failure and logs its choices again."""
    monkeypatch.setattr(kernels, "_failure", None)
    monkeypatch.setattr(kernels, "_noted", set())
    for name in (kernels.COMPILE_ENV, "TORCHDYNAMO_DISABLE", "TORCH_COMPILE_DISABLE"):
        monkeypatch.delenv(name, raising=False)


def _model(compile_kernels=None, dtype=torch.float32) -> BayesianModule:
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2)).to(dtype)
    return BayesianModule(net, compile_kernels=compile_kernels)


def _choice(model: BayesianModule, caplog) -> str:
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="bnnify"):
        model(torch.randn(3, 5, dtype=model.variational[0].mu.dtype))
    messages = [r.getMessage() for r in caplog.records if r.name == "bnnify"]
    return " | ".join(m for m in messages if "training kernels" in m)


@needs_compiler
def test_small_models_stay_eager_unless_forced(caplog, monkeypatch):
    assert _model().variational[0].numel < fused.MIN_COMPILE_NUMEL
    assert "fewer than the 1048576 worth compiling" in _choice(_model(), caplog)
    assert "compiled training kernels" in _choice(_model(compile_kernels=True), caplog)
    monkeypatch.setenv(kernels.COMPILE_ENV, "1")
    assert _model().training_kernels() == ["compiled"]


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        (kernels.COMPILE_ENV, "0", "BNNIFY_COMPILE=0"),
        ("TORCHDYNAMO_DISABLE", "1", "TORCHDYNAMO_DISABLE=1"),
        ("TORCH_COMPILE_DISABLE", "1", "TORCH_COMPILE_DISABLE=1"),
        ("CXX", "/nonexistent/bin/c++", "no C++ compiler"),
    ],
)
def test_the_environment_can_rule_compiling_out(variable, value, reason, caplog, monkeypatch):
    monkeypatch.setenv(variable, value)
    model = _model(compile_kernels=True)
    assert reason in _choice(model, caplog)
    assert model.training_kernels() == [f"eager ({kernels.compile_refusal(CPU)})"]


def test_half_precision_and_the_switch_stay_eager(caplog):
    assert "dtype bfloat16" in _choice(_model(True, torch.bfloat16), caplog)
    assert "compile_kernels=False" in _choice(_model(False), caplog)


def test_the_choice_is_logged_once(caplog):
    model = _model(False)
    assert _choice(model, caplog)
    assert _choice(model, caplog) == ""


@needs_compiler
def test_a_failed_compilation_falls_back_to_eager_with_the_right_result(caplog, monkeypatch):
    def broken(*args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("simulated compiler crash")

        return fail

    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(torch, "compile", broken)
    results = []
    for compile_kernels in (True, False):
        torch.manual_seed(0)
        model = _model(compile_kernels)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="bnnify"):
            torch.manual_seed(1)
            loss = model(torch.randn(3, 5)).square().sum() + model.kl_divergence()
            loss.backward()
        results.append([p.grad for p in model.parameters()])
        if compile_kernels:
            assert "simulated compiler crash" in caplog.text
            assert "torch.compile failed" in model.training_kernels()[0]
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
