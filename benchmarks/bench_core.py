"""Core benchmark: conversion, KL and training cost of bnnify against the plain model.

    python benchmarks/bench_core.py [--quick] [--repeats N] [--out benchmarks/out/bench_core.json]

Every ratio compares two measurements taken in the same process, interleaved
(round robin), as medians; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import os

# The same process settings for every model timed (set before torch is imported):
# huge-page backed CPU tensors, as the bnnify CLI uses.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import (
    PeakRSS,
    cnn,
    deep_linear,
    environment,
    median_ms,
    mlp,
    round_robin,
    write_json,
)

from bnnify.bnn import BayesianModule


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _convert(plain: torch.nn.Module) -> tuple[BayesianModule, float, int]:
    model = copy.deepcopy(plain)
    with PeakRSS() as peak:
        start = time.perf_counter()
        bnn = BayesianModule(model)
        seconds = time.perf_counter() - start
    return bnn, seconds, peak.above


def _kl_floor(bnn: BayesianModule) -> dict[str, float]:
    store = bnn.variational[0]
    mu, rho = store.mu.detach(), store.rho.detach()

    def read() -> None:
        mu.sum()
        rho.sum()

    def flat_pass() -> None:
        sigma = F.softplus(rho)
        (0.5 * (sigma.square() + mu.square() - 1) - sigma.log()).sum()

    def kl() -> None:
        bnn.kl_divergence()

    def kl_backward() -> None:
        bnn.zero_grad(set_to_none=True)
        bnn.kl_divergence().backward()

    times = round_robin(
        {"read": read, "flat": flat_pass, "kl": kl, "kl_bwd": kl_backward}, repeats=7
    )
    return {name: median_ms(t) for name, t in times.items()}


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n_train: int):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    bayesian = isinstance(model, BayesianModule)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if bayesian:
            loss = loss + model.kl_divergence() / n_train
        loss.backward()
        optimizer.step()

    return step


def _predict(model: torch.nn.Module, x: torch.Tensor, samples: int):
    if isinstance(model, BayesianModule):
        return lambda: model.predict_samples(x, num_samples=samples)

    @torch.no_grad()
    def plain() -> None:
        for _ in range(samples):
            model(x)

    return plain


def run_workload(
    name: str,
    plain: torch.nn.Module,
    x_shape: tuple,
    classes: int,
    batch: int,
    repeats: int,
    predict: bool,
) -> dict:
    torch.manual_seed(0)
    bnn, seconds, peak = _convert(plain)
    params = _param_bytes(plain)
    result = {
        "workload": name,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "convert_s": seconds,
        "convert_peak_bytes": peak,
        "convert_peak_over_params": peak / params,
        "kl_ms": _kl_floor(bnn),
    }
    x = torch.randn(batch, *x_shape)
    y = torch.randint(0, classes, (batch,))
    times = round_robin(
        {"plain": _train_step(plain, x, y, 50_000), "bnnify": _train_step(bnn, x, y, 50_000)},
        repeats=repeats,
    )
    result["train_ms"] = {k: median_ms(v) for k, v in times.items()}
    result["train_ratio"] = result["train_ms"]["bnnify"] / result["train_ms"]["plain"]
    if predict:
        plain.eval()
        bnn.eval()
        xp = torch.randn(32, *x_shape)
        times = round_robin(
            {"plain": _predict(plain, xp, 32), "bnnify": _predict(bnn, xp, 32)}, repeats=repeats
        )
        result["predict32_ms"] = {k: median_ms(v) for k, v in times.items()}
        result["predict32_ratio"] = (
            result["predict32_ms"]["bnnify"] / result["predict32_ms"]["plain"]
        )
    return result


def _table(results: list[dict]) -> str:
    header = (
        "| workload | params | convert s | peak / param bytes | KL ms (read floor, flat "
        "pass) | KL+grad ms | train step plain / bnnify ms (ratio) | 32 MC preds ratio |"
    )
    lines = [header, "|" + " --- |" * 8]
    for r in results:
        kl = r["kl_ms"]
        train = r["train_ms"]
        pred = f"{r['predict32_ratio']:.2f}x" if "predict32_ratio" in r else "-"
        lines.append(
            f"| {r['workload']} | {r['parameters'] / 1e6:.2f}M | {r['convert_s']:.2f} | "
            f"{r['convert_peak_over_params']:.2f} | {kl['kl']:.1f} ({kl['read']:.1f}, "
            f"{kl['flat']:.1f}) | {kl['kl_bwd']:.1f} | {train['plain']:.1f} / "
            f"{train['bnnify']:.1f} ({r['train_ratio']:.2f}x) | {pred} |"
        )
    return "\n".join(lines)


def main() -> None:
    # The reference's random posterior init (mu ~ N(0, 0.1)) saturates the big MLP and
    # fills its backward pass with denormal numbers, which x86 computes ~3x slower; a
    # trained model does not. Flushing denormals gives every model the same footing.
    torch.set_flush_denormal(True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_core.json"))
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 9)
    sizes = (784, 512, 512, 10) if args.quick else (784, 4096, 4096, 1024, 10)
    workloads = [
        ("MLP " + "-".join(map(str, sizes)), mlp(sizes), (784,), 10, 128, True),
        ("ResNet-style CNN", cnn(), (3, 32, 32), 10, 64, False),
        ("200 x Linear(64,64)", deep_linear(), (64,), 64, 128, True),
    ]
    results = []
    for name, model, shape, classes, batch, predict in workloads:
        print(f"running {name} ...", file=sys.stderr)
        results.append(run_workload(name, model, shape, classes, batch, repeats, predict))
    print(_table(results))
    write_json(args.out, {"environment": environment(), "repeats": repeats, "results": results})
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
