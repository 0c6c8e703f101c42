"""Fresh against shifted noise: convergence of the ELBO and test metrics, several seeds.

    python benchmarks/noise_experiment.py [--seeds 5] [--epochs 300] [--out PATH]
    python benchmarks/noise_experiment.py --plot RESULTS.json FIGURE.png

Two small tasks (a nonlinear regression and a 5-class classification, synthetic
data drawn once), one MLP each, trained by the same loop (Adam, batches of 128,
KL / N), once with noise="fresh" and once with noise="shifted", compiled kernels
for both. The shifted pool is cut to the model's size (the smallest pool, the
worst case: a large model's pool has its own size). Also measures, at a fixed
posterior, the mean and spread of the gradient estimate over many steps under
each noise.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import environment, write_json

from bnnify.bnn import BayesianModule
from bnnify.bnn.metrics import expected_calibration_error
from bnnify.bnn.noise import ShiftedNoise


def regression_data(seed: int = 1234) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1500, 8, generator=g)
    w = torch.randn(8, generator=g)
    y = (
        torch.sin(2 * x @ w / 8**0.5)
        + 0.3 * x[:, 0] * x[:, 1]
        + 0.1 * torch.randn(1500, generator=g)
    )
    y = ((y - y.mean()) / y.std()).unsqueeze(1)
    return (x[:1000], y[:1000]), (x[1000:], y[1000:])


def classification_data(seed: int = 4321) -> tuple:
    g = torch.Generator().manual_seed(seed)
    centers = 1.6 * torch.randn(5, 20, generator=g)
    labels = torch.randint(0, 5, (2500,), generator=g)
    x = centers[labels] + torch.randn(2500, 20, generator=g) * 1.5
    x = torch.tanh(x) + 0.1 * torch.randn(2500, 20, generator=g)
    return (x[:2000], labels[:2000]), (x[2000:], labels[2000:])


TASKS = {
    "regression": (regression_data, (8, 100, 100, 1)),
    "classification": (classification_data, (20, 128, 128, 5)),
}


def _net(sizes: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _nll(task: str, out: torch.Tensor, y: torch.Tensor, log_noise: torch.Tensor) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(out, y)
    var = (2 * log_noise).exp()
    return (0.5 * (out - y).square() / var + log_noise + 0.5 * math.log(2 * math.pi)).mean()


def train(task: str, noise: str, seed: int, epochs: int) -> dict:
    (x, y), (xt, yt) = TASKS[task][0]()
    torch.manual_seed(seed)
    bnn = BayesianModule(_net(TASKS[task][1]), compile_kernels=True, noise=noise)
    log_noise = torch.zeros((), requires_grad=True)
    params = [*bnn.parameters(), log_noise] if task == "regression" else list(bnn.parameters())
    optimizer = torch.optim.Adam(params, lr=2e-3)
    n, curve = len(x), []
    for _ in range(epochs):
        order = torch.randperm(n)
        total = 0.0
        for start in range(0, n, 128):
            index = order[start : start + 128]
            optimizer.zero_grad(set_to_none=True)
            nll = _nll(task, bnn(x[index]), y[index], log_noise)
            loss = nll + bnn.kl_divergence() / n
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        curve.append(-total / n)  # the ELBO per example, as trained (one sample per step)
    with torch.no_grad():
        draws = bnn.predict_samples(xt, num_samples=100)
        if task == "classification":
            probs = draws.softmax(-1).mean(0)
            metrics = {
                "accuracy": float((probs.argmax(1) == yt).double().mean()),
                "log_likelihood": float(probs[torch.arange(len(yt)), yt].log().mean()),
                "ece": expected_calibration_error(probs, yt),
            }
        else:
            sd = float(log_noise.exp())
            dist = torch.distributions.Normal(draws, sd)
            ll = torch.logsumexp(dist.log_prob(yt), 0) - math.log(draws.shape[0])
            rmse = float((draws.mean(0) - yt).square().mean().sqrt())
            metrics = {"rmse": rmse, "log_likelihood": float(ll.mean())}
    return {"curve": curve, "final_elbo": statistics.fmean(curve[-10:]), "test": metrics}


def gradient_moments(steps: int = 2000) -> dict:
    """Mean and spread of each element's gradient over `steps` draws, fixed posterior."""
    (x, y), _ = TASKS["classification"][0]()
    result = {}
    for noise in ("fresh", "shifted"):
        torch.manual_seed(0)
        bnn = BayesianModule(_net(TASKS["classification"][1]), compile_kernels=True, noise=noise)
        grads = []
        for _ in range(steps):
            bnn.zero_grad(set_to_none=True)
            (F.cross_entropy(bnn(x[:256]), y[:256]) + bnn.kl_divergence() / len(x)).backward()
            store = bnn.variational[0]
            grads.append(torch.cat([store.mu.grad, store.rho.grad]))
        g = torch.stack(grads).double()
        result[noise] = {"mean": g.mean(0), "var": g.var(0)}
    fresh, shifted = result["fresh"], result["shifted"]
    # Difference of means in units of its standard error; ratio of variances.
    se = ((fresh["var"] + shifted["var"]) / steps).sqrt().clamp_min(1e-30)
    z = ((fresh["mean"] - shifted["mean"]) / se).abs()
    ratio = shifted["var"] / fresh["var"].clamp_min(1e-30)
    return {
        "steps": steps,
        "elements": int(z.numel()),
        "mean_abs_z": float(z.mean()),
        "share_abs_z_above_3": float((z > 3).double().mean()),
        "variance_ratio_median": float(ratio.median()),
        "variance_ratio_mean": float(ratio.mean()),
    }


def _summary(runs: list[dict], key: str) -> str:
    values = [r["test"][key] for r in runs]
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values) / len(values) ** 0.5:.4f}"


def plot(results: Path, figure: Path) -> None:
    """The ELBO curves of a results file: mean over seeds, and the band of +-1 s.e."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    fig, axes = plt.subplots(1, len(data["results"]), figsize=(10, 3.6))
    for ax, (task, by_noise) in zip(axes, data["results"].items(), strict=True):
        for noise, runs in by_noise.items():
            curves = torch.tensor([r["curve"] for r in runs], dtype=torch.float64)
            mean, se = curves.mean(0), curves.std(0) / len(runs) ** 0.5
            epochs = torch.arange(1, curves.shape[1] + 1)
            ax.plot(epochs, mean, label=f"{noise} ({len(runs)} seeds)")
            ax.fill_between(epochs, mean - se, mean + se, alpha=0.3)
        ax.set(title=task, xlabel="epoch", ylabel="ELBO / example (training)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(figure, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/noise_experiment.json"))
    parser.add_argument("--plot", nargs=2, type=Path, metavar=("RESULTS", "FIGURE"))
    args = parser.parse_args()
    if args.plot:
        plot(*args.plot)
        return
    # Small models: one thread is faster, and on a shared machine far steadier.
    torch.set_num_threads(1)
    # The smallest pool, the worst case for the shifted noise (see the docstring).
    ShiftedNoise.MIN_POOL = 1
    start = time.perf_counter()
    results: dict = {task: {"fresh": [], "shifted": []} for task in TASKS}
    for task in TASKS:
        for seed in range(args.seeds):
            for noise in ("fresh", "shifted"):
                run = train(task, noise, seed, args.epochs)
                results[task][noise].append(run)
                print(
                    f"{task} {noise} seed {seed}: {run['final_elbo']:.4f} {run['test']}",
                    file=sys.stderr,
                )
    moments = gradient_moments()
    lines = [
        "| task | noise | final ELBO / example | test metrics (mean ± s.e. over seeds) |",
        "| --- | --- | --- | --- |",
    ]
    for task, by_noise in results.items():
        for noise, runs in by_noise.items():
            elbo = [r["final_elbo"] for r in runs]
            keys = sorted(runs[0]["test"])
            metrics = ", ".join(f"{k} {_summary(runs, k)}" for k in keys)
            spread = statistics.stdev(elbo) / len(elbo) ** 0.5
            lines.append(
                f"| {task} | {noise} | {statistics.fmean(elbo):.4f} ± {spread:.4f} | {metrics} |"
            )
    print("\n".join(lines))
    print(moments)
    write_json(
        args.out,
        {
            "environment": environment(),
            "seeds": args.seeds,
            "epochs": args.epochs,
            "results": results,
            "gradient_moments": moments,
            "seconds": time.perf_counter() - start,
        },
    )


if __name__ == "__main__":
    main()
