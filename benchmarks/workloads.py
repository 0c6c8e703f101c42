"""Models, data and timing helpers shared by the benchmarks (same definitions for all tools)."""

from __future__ import annotations

import gc
import itertools
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "PeakRSS",
    "cnn",
    "deep_linear",
    "environment",
    "median_ms",
    "mlp",
    "round_robin",
    "transformer",
    "write_json",
]


def mlp(sizes: tuple[int, ...] = (784, 4096, 4096, 1024, 10)) -> nn.Module:
    """MLP with ReLU between layers (784-4096-4096-1024-10: 24.2M parameters)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def deep_linear(depth: int = 200, width: int = 64) -> nn.Module:
    """`depth` x Linear(width, width) with ReLU between: many small tensors."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _Block(nn.Module):
    def __init__(self, channels: int, stride: int = 1):
        super().__init__()
        out = channels * stride
        self.conv1 = nn.Conv2d(channels, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.skip = (
            nn.Sequential(nn.Conv2d(channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


def transformer(blocks: int = 12, width: int = 1024, heads: int = 16) -> nn.Module:
    """A stack of `blocks` TransformerEncoderLayer (d=width, 4x feed-forward), batch first."""
    layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)


def cnn(num_classes: int = 10) -> nn.Module:
    """A small ResNet-style CNN for 3x32x32 inputs (about 0.7M parameters)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        _Block(32),
        _Block(32, 2),
        _Block(64, 2),
        _Block(128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def round_robin(
    functions: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Times each function `repeats` times, interleaved, after `warmup` calls each.

    CUDA work is synchronized before and after each timed call.
    """
    for _ in range(warmup):
        for function in functions.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            _sync()
            start = time.perf_counter()
            function()
            _sync()
            times[name].append(time.perf_counter() - start)
    return times


def _rss() -> int:
    """Anonymous resident memory: the process's data (library code pages excluded)."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakRSS:
    """Peak anonymous resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.base = _rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def above(self) -> int:
        return self.peak - self.base


def environment() -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
