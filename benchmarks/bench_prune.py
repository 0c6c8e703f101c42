"""Pruning by signal-to-noise ratio: test metrics against the fraction of weights removed.

    python benchmarks/bench_prune.py [--dataset concrete] [--splits 5] [--quick]

For each standard train/test split of a UCI data set (`../shared/data/uci`, as in
`uci.py`): an MLP 8-100-100-1 is trained, converted (MOPED delta 0.1, N(0, 1) prior)
and fitted with `bnnify.fit`; then `bnnify.prune(..., keep=1 - f, data=test)` removes a
fraction f = 0, 50, 75, 90, 95, 98% of its weights by |mu| / sigma, and reports the
test RMSE and log-likelihood (100 weight samples) of the Bayesian model and of its
posterior means. The same fractions removed by |mu| alone (the magnitude baseline,
through the same code) show what the spread adds. Metrics in the original target
units, mean over splits (± standard error).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import uci
from torch import nn
from uci import DATASETS, load_split, standardise

import bnnify
from bnnify.bnn.keys import posterior_key
from bnnify.bnn.prune import prune_gaussian, pruning_masks
from bnnify.enums import Task
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.data import make_dataset
from bnnify.usecases.predict import noise_of, predict_dataset
from bnnify.usecases.runner import ModuleRunner

ROOT = Path(__file__).resolve().parent.parent
FRACTIONS = (0.0, 0.5, 0.75, 0.9, 0.95, 0.98)


def train_mlp(x: torch.Tensor, y: torch.Tensor, hidden: int, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(x.shape[1], hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 1),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 32):
            index = order[start : start + 32]
            optimizer.zero_grad()
            nn.functional.mse_loss(net(x[index]), y[index]).backward()
            optimizer.step()
    return net.eval()


def magnitude_metrics(fitted: Path, net: nn.Module, x, y, keep: float, samples: int, seed: int):
    """The metrics after pruning by |mu| alone, through the runner and predict's code."""
    ckpt = Checkpoint(fitted)
    runner = ModuleRunner(copy.deepcopy(net), ckpt, "cpu")
    states = {name: ckpt.posterior_state(name) for name in ckpt.parameters}
    scores = {name: state["mu"].abs().double().reshape(-1) for name, state in states.items()}
    masks = pruning_masks(scores, keep=keep)
    pruned = {}
    for name, state in states.items():
        mu, rho = prune_gaussian(state["mu"], state["rho"], masks[name])
        pruned |= {posterior_key(name, "mu"): mu, posterior_key(name, "rho"): rho}
    runner.bnn.load_variational_state(pruned, strict=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        result = predict_dataset(
            runner,
            make_dataset(x, y, "test"),
            task=Task.REGRESSION,
            samples=samples,
            noise=noise_of(ckpt.fit_tensors()),
        )
    return result.metrics


def run_split(name: str, split: int, settings: dict, folder: Path) -> dict:
    start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_split(name, split)
    x_tr, x_te, _, _ = standardise(x_tr, x_te)
    y_tr, y_te, _, y_std = standardise(y_tr, y_te)
    x_tr, y_tr, x_te, y_te = (t.float().contiguous() for t in (x_tr, y_tr, x_te, y_te))
    scale = float(y_std)
    net = train_mlp(x_tr, y_tr, settings["hidden"], settings["det_epochs"], seed=split)
    ckpt = folder / f"{name}{split}.bnn.safetensors"
    bnnify.convert(net, output=ckpt, posterior_args={"delta": 0.1}, force=True)
    fitted = folder / f"{name}{split}.fit.safetensors"
    bnnify.fit(
        ckpt,
        net,
        (x_tr, y_tr),
        task="regression",
        epochs=settings["epochs"],
        lr=2e-3,
        batch_size=32,
        # The settings of its recorded results (before the fit defaults of issue 10).
        kl_weight=1.0,
        val_split=0.0,
        seed=split,
        output=fitted,
        force=True,
    )
    rows = []
    for fraction in FRACTIONS:
        result = bnnify.prune(
            fitted,
            net,
            keep=1.0 - fraction,
            data=(x_te, y_te),
            samples=settings["samples"],
            seed=split,
            output=folder / "pruned.safetensors",
            force=True,
        )
        baseline = magnitude_metrics(
            fitted, net, x_te, y_te, 1.0 - fraction, settings["samples"], split
        )
        rows.append(
            {
                "fraction": fraction,
                "removed": result.fraction_removed,
                "snr": _units(result.metrics["after"], scale),
                "magnitude": _units(baseline, scale),
            }
        )
    seconds = time.perf_counter() - start
    print(f"{name} split {split}: {seconds:.0f} s", file=sys.stderr)
    return {"split": split, "elements": result.elements, "rows": rows}


def _units(metrics: dict, scale: float) -> dict:
    """RMSE and log-likelihood in the original target units."""
    return {
        model: {"rmse": m["rmse"] * scale, "log_likelihood": m["log_likelihood"] - math.log(scale)}
        for model, m in metrics.items()
    }


def _cell(values: list[float], digits: int) -> str:
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) / math.sqrt(len(values)):.{digits}f}"


def table(results: list[dict], name: str) -> str:
    lines = [
        f"{name}, {len(results)} split(s), MLP with {results[0]['elements']:,} Bayesian weights; "
        "mean ± standard error over splits, original target units.",
        "",
        "| removed | SNR: RMSE | SNR: test LL | SNR: RMSE of the means | \\|mu\\|: RMSE "
        "| \\|mu\\|: test LL |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for i, fraction in enumerate(FRACTIONS):
        rows = [r["rows"][i] for r in results]

        def values(kind, model, metric, rows=rows):
            return [row[kind][model][metric] for row in rows]

        lines.append(
            f"| {100 * fraction:.0f}% | {_cell(values('snr', 'bayesian', 'rmse'), 3)} | "
            f"{_cell(values('snr', 'bayesian', 'log_likelihood'), 3)} | "
            f"{_cell(values('snr', 'mean_weights', 'rmse'), 3)} | "
            f"{_cell(values('magnitude', 'bayesian', 'rmse'), 3)} | "
            f"{_cell(values('magnitude', 'bayesian', 'log_likelihood'), 3)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="concrete", choices=sorted(DATASETS))
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=400, help="bnnify fit epochs")
    parser.add_argument("--det-epochs", type=int, default=400)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="1 split, 50 epochs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prune")
    parser.add_argument("--data", type=Path, default=None, help="the uci folder")
    args = parser.parse_args()
    # uci.py looks beside the repository; a git worktree lies one folder deeper.
    found = [p for p in (uci.DATA, ROOT.parent.parent / "shared" / "data" / "uci") if p.is_dir()]
    uci.DATA = args.data or (found[0] if found else uci.DATA)
    settings = {
        "hidden": args.hidden,
        "epochs": 50 if args.quick else args.epochs,
        "det_epochs": 50 if args.quick else args.det_epochs,
        "samples": args.samples,
    }
    splits = 1 if args.quick else args.splits
    with tempfile.TemporaryDirectory(prefix="bnnify-prune-") as folder:
        results = [run_split(args.dataset, s, settings, Path(folder)) for s in range(splits)]
    text = table(results, args.dataset)
    print(text)
    suffix = "_quick" if args.quick else ""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"dataset": args.dataset, "settings": settings, "results": results}
    Path(f"{args.out}{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{args.out}{suffix}.md").write_text(text + "\n")
    print(f"wrote {args.out}{suffix}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
