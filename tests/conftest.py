"""Shared fixtures: a seeded RNG per test, registries restored, and the device and dtype.

`pytest --device cuda --dtype float64` runs the device- and dtype-aware core tests
(those taking the `device` and `dtype` fixtures) there; the defaults are cpu, float32.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from bnnify.bnn import PosteriorFactory, PriorFactory

__all__ = []


DTYPES = ("float32", "float64", "float16", "bfloat16")


def pytest_addoption(parser):
    parser.addoption(
        "--seed", type=int, default=0, help="seed of every test's RNG (check statistical tests)"
    )
    parser.addoption("--device", default="cpu", help="device of the device-aware tests (cpu)")
    parser.addoption(
        "--dtype", default="float32", choices=DTYPES, help="dtype of the dtype-aware tests"
    )


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device given by --device (default cpu)."""
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def dtype(request) -> torch.dtype:
    """The floating-point dtype given by --dtype (default float32)."""
    return getattr(torch, request.config.getoption("--dtype"))


@pytest.fixture(autouse=True)
def _seed(request):
    """Every test starts from the same seed, and leaves the global RNG as it found it."""
    option = torch.device(request.config.getoption("--device"))
    devices = [option] if option.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(request.config.getoption("--seed"))
        yield


@pytest.fixture(autouse=True)
def _restore_registries():
    """Unregisters the posterior and prior names a test registered."""
    before = {factory: set(factory._factories) for factory in (PosteriorFactory, PriorFactory)}
    yield
    for factory, names in before.items():
        for key in set(factory._factories) - names:
            del factory._factories[key]
            factory._resolved.pop(key, None)


@pytest.fixture
def mlp():
    """Builds a small MLP `sizes[0] -> ... -> sizes[-1]` with ReLU activations."""

    def build(*sizes: int) -> nn.Sequential:
        sizes = sizes or (3, 8, 2)
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        return nn.Sequential(*layers[:-1])

    return build
