"""Core benchmark: conversion, KL and training cost of bnnify against the plain model.

    python benchmarks/bench_core.py [--device cuda] [--quick] [--repeats N] [--out PATH]

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
    transformer,
    write_json,
)

from bnnify.bnn import BayesianModule


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _convert(plain: torch.nn.Module) -> tuple[BayesianModule, float, int]:
    model = copy.deepcopy(plain)
    cuda = next(plain.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with PeakRSS() as peak:
        start = time.perf_counter()
        bnn = BayesianModule(model)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    above = torch.cuda.max_memory_allocated() - before if cuda else peak.above
    return bnn, seconds, above


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
    loss_fn = F.cross_entropy if y.dtype == torch.long else F.mse_loss

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if bayesian:
            loss = loss + model.kl_divergence() / n_train
        loss.backward()
        optimizer.step()

    return step


def _predict(model: torch.nn.Module, x: torch.Tensor, samples: int, weights: bool = False):
    if isinstance(model, BayesianModule) and not weights:
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
    classes: int | None,
    batch: int,
    repeats: int,
    predict: bool,
    device: str = "cpu",
) -> dict:
    torch.manual_seed(0)
    plain = plain.to(device)
    bnn, seconds, peak = _convert(plain)
    params = _param_bytes(plain)
    result = {
        "workload": name,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "convert_s": seconds,
        "convert_peak_bytes": peak,
        "convert_peak_over_params": peak / params,
        "kl_ms": _kl_floor(bnn),
        "kernels": bnn.training_kernels(),
    }
    x = torch.randn(batch, *x_shape, device=device)
    if classes is None:
        y = torch.randn_like(x)
    else:
        y = torch.randint(0, classes, (batch,), device=device)
    start = time.perf_counter()
    _train_step(bnn, x, y, 50_000)()
    result["first_step_s"] = time.perf_counter() - start
    steps = {"plain": _train_step(plain, x, y, 50_000), "bnnify": _train_step(bnn, x, y, 50_000)}
    if bnn.training_kernels() == ["compiled"]:
        # The opt-in cheap noise, timed on a copy (the same posterior).
        shifted = copy.deepcopy(bnn)
        shifted.noise = "shifted"
        steps["shifted"] = _train_step(shifted, x, y, 50_000)
    times = round_robin(
        steps,
        repeats=repeats,
    )
    result["train_ms"] = {k: median_ms(v) for k, v in times.items()}
    result["train_ratio"] = result["train_ms"]["bnnify"] / result["train_ms"]["plain"]
    if "shifted" in result["train_ms"]:
        result["train_ratio_shifted"] = result["train_ms"]["shifted"] / result["train_ms"]["plain"]
    if predict:
        plain.eval()
        bnn.eval()
        xp = torch.randn(32, *x_shape, device=device)
        # bnnify's default (the local trick where proven) and weight-sampled passes.
        times = round_robin(
            {
                "plain": _predict(plain, xp, 32),
                "bnnify": _predict(bnn, xp, 32),
                "weights": _predict(bnn, xp, 32, weights=True),
            },
            repeats=repeats,
        )
        ms = result["predict32_ms"] = {k: median_ms(v) for k, v in times.items()}
        result["predict32_ratio"] = ms["bnnify"] / ms["plain"]
        result["predict32_weights_ratio"] = ms["weights"] / ms["plain"]
    return result


def _table(results: list[dict]) -> str:
    header = (
        "| workload | params | convert s | peak / param bytes | KL ms (read floor, flat "
        "pass) | KL+grad ms | train step plain / bnnify ms (ratio) | 32 MC preds ratio (local "
        "trick / weights sampled) |"
    )
    lines = [header, "|" + " --- |" * 8]
    for r in results:
        kl = r["kl_ms"]
        train = r["train_ms"]
        shifted = ""
        if "shifted" in train:
            shifted = f"; shifted noise {train['shifted']:.1f} ({r['train_ratio_shifted']:.2f}x)"
        pred = "-"
        if "predict32_ratio" in r:
            pred = f"{r['predict32_ratio']:.2f}x / {r['predict32_weights_ratio']:.2f}x"
        lines.append(
            f"| {r['workload']} | {r['parameters'] / 1e6:.2f}M | {r['convert_s']:.2f} | "
            f"{r['convert_peak_over_params']:.2f} | {kl['kl']:.1f} ({kl['read']:.1f}, "
            f"{kl['flat']:.1f}) | {kl['kl_bwd']:.1f} | {train['plain']:.1f} / "
            f"{train['bnnify']:.1f} ({r['train_ratio']:.2f}x){shifted} | {pred} |"
        )
    return "\n".join(lines)


def _workloads(device: str, quick: bool) -> list[tuple]:
    """(name, model builder, input shape, classes or None for MSE, batch, predict)."""
    if device.startswith("cuda"):
        big = (1024, *([8192] * 5), 1024)
        return [
            ("MLP " + "-".join(map(str, big)), lambda: mlp(big), (1024,), 1024, 512, True),
            ("transformer 12 x d1024", transformer, (128, 1024), None, 16, False),
            ("200 x Linear(64,64)", deep_linear, (64,), 64, 128, True),
        ]
    sizes = (784, 512, 512, 10) if quick else (784, 4096, 4096, 1024, 10)
    return [
        ("MLP " + "-".join(map(str, sizes)), lambda: mlp(sizes), (784,), 10, 128, True),
        ("ResNet-style CNN", cnn, (3, 32, 32), 10, 64, False),
        ("200 x Linear(64,64)", deep_linear, (64,), 64, 128, True),
    ]


def main() -> None:
    # The reference's random posterior init (mu ~ N(0, 0.1)) saturates the big MLP and
    # fills its backward pass with denormal numbers, which x86 computes ~3x slower; a
    # trained model does not. Flushing denormals gives every model the same footing.
    torch.set_flush_denormal(True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small models, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_core.json"))
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    repeats = args.repeats or (3 if args.quick else 9)
    results = []
    for name, build, shape, classes, batch, predict in _workloads(args.device, args.quick):
        print(f"running {name} ...", file=sys.stderr)
        results.append(
            run_workload(name, build(), shape, classes, batch, repeats, predict, args.device)
        )
    print(_table(results))
    data = {"environment": environment(), "device": args.device, "repeats": repeats}
    write_json(args.out, data | {"results": results})
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
