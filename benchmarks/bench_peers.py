"""bnnify beside torchbayesian and bayesian-torch on the same workloads, in one process.

    make bench-peers            # installs torchbayesian==0.2.1 and bayesian-torch==0.5.0
    python benchmarks/bench_peers.py [--device cuda] [--repeats N] [--quick]

Installs nothing itself: a peer that is not importable is reported as missing.
Each workload times the plain model and every tool round robin; the table shows
medians and ratios to the plain model timed in the same run. All tools use the
same optimizer implementation (fused Adam) and the same Gaussian N(0, 1) prior.
"""

from __future__ import annotations

import argparse
import os

# The same process settings for every model timed (set before torch is imported):
# huge-page backed CPU tensors, as the bnnify CLI uses.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import copy
import importlib.util
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import (
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

TOOLS = ("bnnify", "torchbayesian", "bayesian-torch")
WEIGHTS = "bnnify, weights sampled"
SHIFTED = "bnnify, shifted noise"
EAGER = "bnnify, eager kernels"
READ = "read floor"


def _available(tool: str) -> bool:
    module = {"torchbayesian": "torchbayesian", "bayesian-torch": "bayesian_torch"}.get(tool)
    return module is None or importlib.util.find_spec(module) is not None


def convert(tool: str, plain: nn.Module) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """A Bayesian copy of `plain` by `tool`, and its KL function."""
    model = copy.deepcopy(plain)
    if tool == "bnnify":
        bnn = BayesianModule(model)
        return bnn, bnn.kl_divergence
    if tool == "torchbayesian":
        import torchbayesian.bnn as tb

        bnn = tb.BayesianModule(model)
        return bnn, bnn.kl_divergence
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn, get_kl_loss

    dnn_to_bnn(
        model,
        {
            "prior_mu": 0.0,
            "prior_sigma": 1.0,
            "posterior_mu_init": 0.0,
            "posterior_rho_init": -3.0,
            "type": "Reparameterization",
            "moped_enable": False,
            "moped_delta": 0.5,
        },
    )
    return model, lambda: get_kl_loss(model)


def train_step(
    model: nn.Module,
    kl: Callable | None,
    x: torch.Tensor,
    target: torch.Tensor,
    loss_fn: Callable,
    n_train: int = 50_000,
) -> Callable[[], None]:
    fused = {"fused": True} if x.device.type in ("cpu", "cuda") else {}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, **fused)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), target)
        if kl is not None:
            loss = loss + kl() / n_train
        loss.backward()
        optimizer.step()

    return step


def predictions(
    tool: str | None, model: nn.Module, x: torch.Tensor, samples: int = 32
) -> Callable[[], None]:
    if tool == "bnnify":
        return lambda: model.predict_samples(x, num_samples=samples)

    @torch.no_grad()
    def loop() -> None:
        for _ in range(samples):
            model(x)

    return loop


def workloads(device: str, quick: bool) -> list[dict]:
    cuda = device.startswith("cuda")
    if cuda:
        big = (1024, *([8192] * 5), 1024)
        return [
            {
                "name": "MLP " + "-".join(map(str, big)),
                "model": lambda: mlp(big),
                "x": (1024,),
                "batch": 512,
                "classes": 1024,
                "kl": True,
                "predict": True,
            },
            {
                "name": "transformer 12 x d1024",
                "model": transformer,
                "x": (128, 1024),
                "batch": 16,
                "classes": None,
                "kl": False,
                "predict": False,
            },
            {
                "name": "200 x Linear(64,64)",
                "model": deep_linear,
                "x": (64,),
                "batch": 128,
                "classes": 64,
                "kl": True,
                "predict": True,
            },
        ]
    sizes = (784, 1024, 1024, 10) if quick else (784, 4096, 4096, 1024, 10)
    return [
        {
            "name": "MLP " + "-".join(map(str, sizes)),
            "model": lambda: mlp(sizes),
            "x": (784,),
            "batch": 128,
            "classes": 10,
            "kl": True,
            "predict": True,
        },
        {
            "name": "200 x Linear(64,64)",
            "model": deep_linear,
            "x": (64,),
            "batch": 128,
            "classes": 64,
            "kl": True,
            "predict": True,
        },
        {
            "name": "ResNet-style CNN",
            "model": cnn,
            "x": (3, 32, 32),
            "batch": 64,
            "classes": 10,
            "kl": False,
            "predict": False,
        },
    ]


def _read_floor(bnn: nn.Module) -> Callable[[], None]:
    """One read of every mu and rho: the least any KL of the store can cost."""
    stores = [(store.mu.detach(), store.rho.detach()) for store in bnn.variational]

    def read() -> None:
        for mu, rho in stores:
            mu.sum()
            rho.sum()

    return read


def run(spec: dict, tools: list[str], device: str, repeats: int, eager: bool = False) -> dict:
    torch.manual_seed(0)
    plain = spec["model"]().to(device)
    x = torch.randn(spec["batch"], *spec["x"], device=device)
    if spec["classes"] is None:
        target, loss_fn = torch.randn_like(x), F.mse_loss
    else:
        target = torch.randint(0, spec["classes"], (spec["batch"],), device=device)
        loss_fn = F.cross_entropy
    models, kls, failures = {}, {}, {}
    for tool in tools:
        try:
            models[tool], kls[tool] = convert(tool, plain)
            models[tool](x)
        except Exception as error:  # a peer that cannot convert this model: report it
            failures[tool] = f"{type(error).__name__}: {error}".splitlines()[0][:160]
            traceback.print_exc(limit=1, file=sys.stderr)
    result: dict = {"workload": spec["name"], "failures": failures, "ms": {}, "ratio": {}}
    steps = {"plain": train_step(plain, None, x, target, loss_fn)}
    steps |= {t: train_step(m, kls[t], x, target, loss_fn) for t, m in models.items()}
    if "bnnify" in models and models["bnnify"].training_kernels() == ["compiled"]:
        shifted = copy.deepcopy(models["bnnify"])
        shifted.noise = "shifted"  # the opt-in cheap noise, beside the default
        steps[SHIFTED] = train_step(shifted, shifted.kl_divergence, x, target, loss_fn)
        if eager:
            # The eager kernels (as BNNIFY_COMPILE=0, main's path before the compiled
            # step), timed in the same round robin: the before/after of one process.
            eager_bnn = BayesianModule(copy.deepcopy(plain), compile_kernels=False).to(device)
            kls[EAGER] = eager_bnn.kl_divergence
            steps[EAGER] = train_step(eager_bnn, kls[EAGER], x, target, loss_fn)
    # The first step of each: bnnify's includes compiling its kernels (or loading them).
    result["first_step_ms"] = {t: median_ms(v) for t, v in round_robin(steps, 1, 0).items()}
    if "bnnify" in models:
        result["bnnify_kernels"] = models["bnnify"].training_kernels()
    _record(result, "train_step", round_robin(steps, repeats))
    if spec["kl"]:
        kl_calls = {t: kls[t] for t in models}
        if "bnnify" in models:
            kl_calls[READ] = _read_floor(models["bnnify"])
            if EAGER in kls:
                kl_calls[EAGER] = kls[EAGER]
        times = round_robin(kl_calls, repeats)
        result["ms"]["kl"] = {t: median_ms(v) for t, v in times.items()}
    if spec["predict"]:
        for model in (plain, *models.values()):
            model.eval()
        xp = x[:32]
        preds = {"plain": predictions(None, plain, xp)}
        preds |= {t: predictions(t, m, xp) for t, m in models.items()}
        if "bnnify" in models:
            # The same weight-sampled passes as the peers, beside bnnify's default.
            preds[WEIGHTS] = predictions(None, models["bnnify"], xp)
        _record(result, "predict32", round_robin(preds, repeats))
    return result


def _record(result: dict, key: str, times: dict[str, list[float]]) -> None:
    medians = {t: median_ms(v) for t, v in times.items()}
    result["ms"][key] = medians
    result["ratio"][key] = {t: m / medians["plain"] for t, m in medians.items() if t != "plain"}


def table(results: list[dict], tools: list[str]) -> str:
    lines = [
        "| workload | measure | plain | " + " | ".join(tools) + " |",
        "|" + " --- |" * (3 + len(tools)),
    ]
    for r in results:
        for key in ("train_step", "predict32", "kl"):
            if key not in r["ms"]:
                continue
            ms = r["ms"][key]
            cells = []
            for tool in tools:
                if tool in r["failures"]:
                    cells.append(f"failed ({r['failures'][tool][:40]})")
                elif tool not in ms:
                    cells.append("missing")
                elif key == "kl":
                    cells.append(f"{ms[tool]:.1f} ms")
                    if tool == "bnnify" and READ in ms:
                        floor = f"{ms[tool] / ms[READ]:.1f}x the read floor {ms[READ]:.1f} ms"
                        cells[-1] = f"{cells[-1]} ({floor})"
                    if tool == "bnnify" and EAGER in ms:
                        cells[-1] = f"{cells[-1]}; {ms[EAGER]:.1f} ms eager"
                else:
                    cells.append(f"{ms[tool]:.1f} ms ({r['ratio'][key][tool]:.2f}x)")
                if key == "predict32" and tool == "bnnify" and WEIGHTS in ms:
                    weights = f"{ms[WEIGHTS]:.1f} ms ({r['ratio'][key][WEIGHTS]:.2f}x)"
                    cells[-1] = f"{cells[-1]} local trick; {weights} weights sampled"
                if key == "train_step" and tool == "bnnify" and SHIFTED in ms:
                    shifted = f"{ms[SHIFTED]:.1f} ms ({r['ratio'][key][SHIFTED]:.2f}x)"
                    cells[-1] = f"{cells[-1]}; {shifted} shifted noise"
                if key == "train_step" and tool == "bnnify" and EAGER in ms:
                    eager = f"{ms[EAGER]:.1f} ms ({r['ratio'][key][EAGER]:.2f}x)"
                    cells[-1] = f"{cells[-1]}; {eager} eager kernels"
            plain = "-" if key == "kl" else f"{ms['plain']:.1f} ms"
            label = {
                "train_step": "train step",
                "predict32": "32 MC predictions (peers: weights sampled)",
                "kl": "kl_divergence()",
            }[key]
            lines.append(f"| {r['workload']} | {label} | {plain} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    # The reference's random posterior init (mu ~ N(0, 0.1)) saturates the big MLP and
    # fills its backward pass with denormal numbers, which x86 computes ~3x slower; a
    # trained model does not. Flushing denormals gives every model the same footing.
    torch.set_flush_denormal(True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset")
    parser.add_argument("--only", default="", help="workloads whose name contains this")
    parser.add_argument(
        "--eager", action="store_true", help="also time bnnify's eager kernels, same process"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_peers.json"))
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    chosen = [t for t in TOOLS if t in args.tools.split(",")]
    tools = [t for t in chosen if _available(t)]
    missing = [t for t in chosen if t not in tools]
    if missing:
        print(f"not importable (run `make bench-peers`): {', '.join(missing)}", file=sys.stderr)
    repeats = args.repeats or (3 if args.quick else 7)
    results = []
    for spec in workloads(args.device, args.quick):
        if args.only not in spec["name"]:
            continue
        print(f"running {spec['name']} ...", file=sys.stderr)
        results.append(run(spec, tools, args.device, repeats, args.eager))
    print(table(results, tools))
    write_json(
        args.out,
        {
            "environment": environment(),
            "device": args.device,
            "repeats": repeats,
            "missing": missing,
            "results": results,
        },
    )
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
