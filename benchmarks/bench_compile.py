"""The compiled training step: its compile time, and from what size it pays.

    python benchmarks/bench_compile.py [--repeats N] [--out benchmarks/out/bench_compile.json]

Part 1 times the first training step of a fresh process, with torch's compile
cache emptied (cold, as on a first run) and kept (warm, every later run), against
the same step with BNNIFY_COMPILE=0. Part 2 times a whole `bnnify fit` (convert
once, then one epoch) the same three ways. Part 3 times training steps of MLPs of
growing size, eager and compiled kernels, round robin in one process, as medians.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import environment, median_ms, mlp, round_robin, write_json

from bnnify.bnn import BayesianModule

# Store sizes from 2^15 to 2^23 elements: 784-h-h-10 MLPs.
WIDTHS = (32, 64, 128, 256, 512, 1024, 2048)

_FIRST_STEP = """
import json, os, sys, time
start = time.perf_counter()
import torch, torch.nn.functional as F
sys.path.insert(0, {here!r})
from workloads import mlp
from bnnify.bnn import BayesianModule
torch.manual_seed(0)
bnn = BayesianModule(mlp((784, 4096, 4096, 1024, 10)))
optimizer = torch.optim.Adam(bnn.parameters(), lr=1e-4, fused=True)
x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
steps = []
for _ in range(3):
    t = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    (F.cross_entropy(bnn(x), y) + bnn.kl_divergence() / 50000).backward()
    optimizer.step()
    steps.append(time.perf_counter() - t)
print(json.dumps({{"steps": steps, "total": time.perf_counter() - start}}))
"""


def first_steps(mode: str, cache: Path) -> dict:
    """The first three steps of a fresh process: `cold`, `warm` or `eager`."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache))
    if mode == "eager":
        env["BNNIFY_COMPILE"] = "0"
    code = _FIRST_STEP.format(here=str(Path(__file__).resolve().parent))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def compile_time(rounds: int) -> dict:
    results: dict[str, list] = {"cold": [], "warm": [], "eager": []}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="bnnify-inductor-") as cache:
            for mode in ("cold", "warm", "eager"):
                results[mode].append(first_steps(mode, Path(cache)))
    summary = {}
    for mode, runs in results.items():
        firsts = sorted(r["steps"][0] for r in runs)
        thirds = sorted(r["steps"][2] for r in runs)
        summary[mode] = {"first_step_s": firsts[len(firsts) // 2], "third_step_s": thirds[-1]}
    for mode in ("cold", "warm"):
        extra = summary[mode]["first_step_s"] - summary["eager"]["first_step_s"]
        summary[mode]["added_s"] = extra
    return {"runs": results, "summary": summary}


def cli_fit(rounds: int) -> dict:
    """Wall seconds of `bnnify fit` (1 epoch, 2,048 examples) of a 1.9M-weight MLP."""
    with tempfile.TemporaryDirectory(prefix="bnnify-fit-") as folder:
        root = Path(folder)
        torch.manual_seed(0)
        model = torch.jit.script(mlp((784, 1024, 1024, 10)).eval())
        model.save(str(root / "model.pt"))
        from safetensors.torch import save_file

        x, y = torch.randn(2048, 784), torch.randint(0, 10, (2048,))
        save_file({"x": x, "y": y}, str(root / "data.safetensors"))
        bnnify = [sys.executable, "-m", "bnnify"]
        run = {"check": True, "capture_output": True, "cwd": root}
        subprocess.run([*bnnify, "convert", "model.pt", "-o", "m.bnn.safetensors"], **run)
        fit = [*bnnify, "fit", "m.bnn.safetensors", "-m", "model.pt", "-d", "data.safetensors"]
        fit += ["--task", "classification", "--epochs", "1", "--force", "-q"]
        times: dict[str, list[float]] = {"cold": [], "warm": [], "eager": []}
        for _ in range(rounds):
            with tempfile.TemporaryDirectory(prefix="bnnify-inductor-") as cache:
                for mode in ("cold", "warm", "eager"):
                    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
                    if mode == "eager":
                        env["BNNIFY_COMPILE"] = "0"
                    start = time.perf_counter()
                    subprocess.run(fit, env=env, **run)
                    times[mode].append(time.perf_counter() - start)
    medians = {mode: sorted(t)[len(t) // 2] for mode, t in times.items()}
    return {"runs": times, "median_s": medians}


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if isinstance(model, BayesianModule):
            loss = loss + model.kl_divergence() / 50_000
        loss.backward()
        optimizer.step()

    return step


def one_size(width: int, compiled: bool, repeats: int) -> dict:
    """Plain and Bayesian step times (ms) of the 784-w-w-10 MLP, round robin."""
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    torch.manual_seed(0)
    plain = mlp((784, width, width, 10))
    torch.manual_seed(0)
    bnn = BayesianModule(mlp((784, width, width, 10)), compile_kernels=compiled)
    steps = {"plain": _step(plain, x, y), "bnnify": _step(bnn, x, y)}
    times = {k: median_ms(v) for k, v in round_robin(steps, repeats, warmup=3).items()}
    return times | {"numel": sum(p.numel() for p in plain.parameters())}


def by_size(repeats: int) -> list[dict]:
    """Eager and compiled kernels, each in a process of its own beside the plain model
    (an eager and a compiled model interleaved in one process slow each other down)."""
    rows = []
    for width in WIDTHS:
        row: dict = {"width": width}
        for mode in ("eager", "compiled"):
            command = [sys.executable, __file__, "--one", str(width), mode]
            command += ["--repeats", str(repeats)]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        row["numel"] = row["eager"]["numel"]
        plain = (row["eager"]["plain"] + row["compiled"]["plain"]) / 2
        ratios = {mode: row[mode]["bnnify"] / row[mode]["plain"] for mode in ("eager", "compiled")}
        row["ratio"] = ratios
        row["saved_ms"] = (ratios["eager"] - ratios["compiled"]) * plain
        print(
            f"{row['numel']:>9} elements: {ratios} saved {row['saved_ms']:.2f} ms", file=sys.stderr
        )
        rows.append(row)
    return rows


def table(sizes: list[dict], compiled: dict, fit: dict) -> str:
    lines = [
        "| store elements | plain ms (eager run / compiled run) | eager ms | compiled ms "
        "| saved per step "
        "| steps to repay a warm compile |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    warm = compiled["summary"]["warm"]["added_s"] * 1e3
    for r in sizes:
        e, c, saved = r["eager"], r["compiled"], r["saved_ms"]
        repay = f"{warm / saved:.0f}" if saved > 0 else "never"
        lines.append(
            f"| {r['numel']:,} | {e['plain']:.2f} / {c['plain']:.2f} | {e['bnnify']:.2f} "
            f"({r['ratio']['eager']:.2f}x) | {c['bnnify']:.2f} ({r['ratio']['compiled']:.2f}x) "
            f"| {saved:.2f} ms | {repay} |"
        )
    s = compiled["summary"]
    lines += [
        "",
        "| first training step of a fresh process (MLP 24.2M) | seconds | added by compiling |",
        "| --- | --- | --- |",
    ]
    for mode in ("eager", "warm", "cold"):
        added = "-" if mode == "eager" else f"{s[mode]['added_s']:.1f} s"
        lines.append(f"| {mode} | {s[mode]['first_step_s']:.1f} | {added} |")
    f = fit["median_s"]
    lines += [
        "",
        "| `bnnify fit`, 1 epoch, MLP 1.9M | seconds | added by compiling |",
        "| --- | --- | --- |",
    ]
    for mode in ("eager", "warm", "cold"):
        added = "-" if mode == "eager" else f"{f[mode] - f['eager']:.1f} s"
        lines.append(f"| {mode} | {f[mode]:.1f} | {added} |")
    return "\n".join(lines)


def main() -> None:
    torch.set_flush_denormal(True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per mode")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_compile.json"))
    parser.add_argument("--one", nargs=2, metavar=("WIDTH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        width, mode = int(args.one[0]), args.one[1]
        print(json.dumps(one_size(width, mode == "compiled", args.repeats)))
        return
    start = time.perf_counter()
    compiled = compile_time(args.rounds)
    fit = cli_fit(args.rounds)
    sizes = by_size(args.repeats)
    print(table(sizes, compiled, fit))
    data = {"environment": environment(), "compile": compiled, "cli_fit": fit, "sizes": sizes}
    data["seconds"] = time.perf_counter() - start
    write_json(args.out, data)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
