"""UCI regression benchmark through the CLI: train, convert, fit, predict (20 splits).

    python benchmarks/uci.py [--quick] [--datasets boston,concrete,energy,yacht] [--jobs 2]
                             [--noise fresh|shifted] [--compile]

For each dataset and each of its standard train/test splits (`../shared/data/uci`):
inputs and targets are standardised on the training part; a one-hidden-layer
network of 50 units is trained by this script and saved as TorchScript; then
`bnnify convert`, `bnnify fit` and `bnnify predict --targets` run as subprocesses.
Test RMSE and log-likelihood are reported in the original target units (mean and
standard error over splits) next to the deterministic network with a noise scale
fitted on its training residuals, and next to published results on the same splits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
# The shared data beside the checkout (../shared), or above a worktree (../../shared).
DATA = next(
    (
        p / "shared" / "data" / "uci"
        for p in ROOT.parents
        if (p / "shared" / "data" / "uci").is_dir()
    ),
    ROOT.parent / "shared" / "data" / "uci",
)
DATASETS = {"boston": "bostonHousing", "concrete": "concrete", "energy": "energy", "yacht": "yacht"}
# Test log-likelihood (mean, standard error) published on these splits.
PUBLISHED = {
    "boston": {"vi": (-2.90, 0.07), "mc_dropout": (-2.40, 0.04)},
    "concrete": {"vi": (-3.39, 0.02), "mc_dropout": (-2.94, 0.02)},
    "energy": {"vi": (-2.39, 0.03), "mc_dropout": (-1.21, 0.01)},
    "yacht": {"vi": (-3.43, 0.16), "mc_dropout": (-1.25, 0.08)},
}


def load_split(name: str, split: int) -> tuple:
    folder = DATA / DATASETS[name]
    table = torch.tensor(
        [
            [float(v) for v in line.split()]
            for line in (folder / "data.txt").read_text().splitlines()
            if line.strip()
        ],
        dtype=torch.float64,
    )
    train = [int(float(v)) for v in (folder / f"index_train_{split}.txt").read_text().split()]
    test = [int(float(v)) for v in (folder / f"index_test_{split}.txt").read_text().split()]
    x, y = table[:, :-1], table[:, -1:]
    return x[train], y[train], x[test], y[test]


def standardise(train: torch.Tensor, test: torch.Tensor) -> tuple:
    mean, std = train.mean(0), train.std(0)
    std[std == 0] = 1.0
    return (train - mean) / std, (test - mean) / std, mean, std


def train_network(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(x.shape[1], 50), nn.ReLU(), nn.Linear(50, 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    x, y = x.float(), y.float()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 32):
            index = order[start : start + 32]
            optimizer.zero_grad()
            nn.functional.mse_loss(net(x[index]), y[index]).backward()
            optimizer.step()
    return net.eval()


def gaussian_ll(error: torch.Tensor, sigma: float) -> float:
    return float(
        (-0.5 * (error / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)).mean()
    )


def cli(*args: str, env: dict) -> dict:
    command = [sys.executable, "-m", "bnnify", *args, "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout)


def run_split(name: str, split: int, settings: dict, workdir: Path) -> dict:
    start = time.perf_counter()
    folder = workdir / f"{name}_{split}"
    folder.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = load_split(name, split)
    x_tr, x_te, _, _ = standardise(x_tr, x_te)
    y_trs, y_tes, _, y_std = standardise(y_tr, y_te)
    scale = float(y_std)
    net = train_network(x_tr, y_trs, settings["det_epochs"], seed=split)
    with torch.no_grad():
        train_error = net(x_tr.float()).double() - y_trs
        test_error = net(x_te.float()).double() - y_tes
    sigma = float(train_error.square().mean().sqrt())
    deterministic = {
        "rmse": float(test_error.square().mean().sqrt()) * scale,
        "log_likelihood": gaussian_ll(test_error, sigma) - math.log(scale),
    }
    model = folder / "model.pt"
    torch.jit.save(torch.jit.script(net), str(model))
    save_file(
        {"x": x_tr.float().contiguous(), "y": y_trs.float().contiguous()},
        str(folder / "train.safetensors"),
    )
    save_file(
        {"x": x_te.float().contiguous(), "y": y_tes.float().contiguous()},
        str(folder / "test.safetensors"),
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(settings["threads"])}
    if settings["compile"]:
        env["BNNIFY_COMPILE"] = "1"  # these models are below the compiling threshold
    ckpt = folder / "model.bnn.safetensors"
    cli(
        "convert",
        str(model),
        "-o",
        str(ckpt),
        "--report",
        str(folder / "model.kl.safetensors"),
        "--posterior-arg",
        f"delta={settings['delta']}",
        "--prior-arg",
        f"sigma={settings['prior_sigma']}",
        "--force",
        env=env,
    )
    fitted = folder / "model.fit.safetensors"
    cli(
        "fit",
        str(ckpt),
        "--model",
        str(model),
        "--data",
        str(folder / "train.safetensors"),
        "--task",
        "regression",
        "--epochs",
        str(settings["epochs"]),
        "--lr",
        str(settings["lr"]),
        "--batch-size",
        "32",
        "--mc-samples",
        str(settings["mc_samples"]),
        "--out",
        str(fitted),
        "--seed",
        str(split),
        "--noise",
        settings["noise"],
        "--force",
        env=env,
    )
    result = cli(
        "predict",
        str(fitted),
        "--model",
        str(model),
        "--input",
        str(folder / "test.safetensors"),
        "--targets",
        str(folder / "test.safetensors"),
        "--samples",
        str(settings["samples"]),
        "--seed",
        str(split),
        env=env,
    )
    metrics = result["metrics"]["bayesian"]
    bayesian = {
        "rmse": metrics["rmse"] * scale,
        "log_likelihood": metrics["log_likelihood"] - math.log(scale),
    }
    mean_w = result["metrics"]["mean_weights"]
    return {
        "dataset": name,
        "split": split,
        "bnnify": bayesian,
        "deterministic": deterministic,
        "mean_weights": {
            "rmse": mean_w["rmse"] * scale,
            "log_likelihood": mean_w["log_likelihood"] - math.log(scale),
        },
        "seconds": time.perf_counter() - start,
    }


def summarise(rows: list[dict], key: str, metric: str) -> tuple[float, float]:
    values = [r[key][metric] for r in rows]
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.mean(values), se


def report(results: dict[str, list[dict]], settings: dict) -> str:
    lines = [
        f"UCI regression, {settings['splits_label']} splits per dataset; mean ± standard error "
        "over splits, original target units.",
        "",
        "| dataset | bnnify RMSE | deterministic RMSE | bnnify test LL | deterministic test LL | "
        "VI (published) | MC dropout (published) | better than VI | within 1 SE of MC dropout |",
        "|" + " --- |" * 9,
    ]
    for name, rows in results.items():
        b_rmse, b_rmse_se = summarise(rows, "bnnify", "rmse")
        d_rmse, d_rmse_se = summarise(rows, "deterministic", "rmse")
        b_ll, b_ll_se = summarise(rows, "bnnify", "log_likelihood")
        d_ll, d_ll_se = summarise(rows, "deterministic", "log_likelihood")
        vi, mc = PUBLISHED[name]["vi"], PUBLISHED[name]["mc_dropout"]
        within = abs(b_ll - mc[0]) <= max(b_ll_se, mc[1]) or b_ll > mc[0]
        lines.append(
            f"| {name} ({len(rows)}) | {b_rmse:.3f} ± {b_rmse_se:.3f} | {d_rmse:.3f} ± "
            f"{d_rmse_se:.3f} | {b_ll:.3f} ± {b_ll_se:.3f} | {d_ll:.3f} ± {d_ll_se:.3f} | "
            f"{vi[0]:.2f} ± {vi[1]:.2f} | {mc[0]:.2f} ± {mc[1]:.2f} | "
            f"{'yes' if b_ll > vi[0] else 'no'} | {'yes' if within else 'no'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 splits, fewer epochs")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--splits", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="bnnify fit epochs")
    parser.add_argument("--det-epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=2e-3, help="bnnify fit learning rate")
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--prior-sigma", type=float, default=1.0)
    parser.add_argument("--mc-samples", type=int, default=1)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--noise", default="fresh", help="bnnify fit --noise")
    parser.add_argument(
        "--compile", action="store_true", help="BNNIFY_COMPILE=1: compiled training kernels"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "uci")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    splits = args.splits or (3 if args.quick else 20)
    settings = {
        "det_epochs": args.det_epochs or (200 if args.quick else 1000),
        "epochs": args.epochs or (200 if args.quick else 1000),
        "lr": args.lr,
        "delta": args.delta,
        "prior_sigma": args.prior_sigma,
        "mc_samples": args.mc_samples,
        "samples": args.samples,
        "noise": args.noise,
        "compile": args.compile,
        "threads": max(1, (os.cpu_count() or 2) // args.jobs),
        "splits_label": f"{splits}",
    }
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bnnify-uci-"))
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    jobs = [(name, split) for name in names for split in range(splits)]
    results: dict[str, list[dict]] = {name: [] for name in names}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_split, name, split, settings, workdir) for name, split in jobs]
        for future in futures:
            row = future.result()
            results[row["dataset"]].append(row)
            print(
                f"{row['dataset']} split {row['split']}: bnnify LL "
                f"{row['bnnify']['log_likelihood']:.3f} RMSE {row['bnnify']['rmse']:.3f} | "
                f"deterministic LL {row['deterministic']['log_likelihood']:.3f} "
                f"({row['seconds']:.0f} s)",
                file=sys.stderr,
            )
    table = report(results, settings)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    Path(f"{args.out}{suffix}.json").write_text(
        json.dumps({"settings": settings, "published": PUBLISHED, "results": results}, indent=2)
        + "\n"
    )
    Path(f"{args.out}{suffix}.md").write_text(table + "\n")
    print(f"wrote {args.out}{suffix}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
