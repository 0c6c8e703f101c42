"""UCI regression: bnnify's convert -> fit -> predict, with choices made on validation data only.

    python benchmarks/uci.py [--splits N] [--datasets boston,yacht] [--jobs 2] [--search]
                              [--noise fresh|shifted] [--compile]
    python benchmarks/uci.py --select [--splits 3]     # choose fit defaults (validation only)

Data: `../shared/data/uci/<dataset>/` with the 20 standard splits (`index_train_K.txt`,
`index_test_K.txt`; the last column of `data.txt` is the target).

Protocol, per split K (seeded by K): 20% of the training split is carved out as a
validation split. Inputs and targets are standardised on what remains; a network of one
hidden layer of 50 ReLU units is trained on it by Adam (mean squared error, batch 32,
lr 1e-3), its epoch chosen by early stopping on the validation split. That network is
the deterministic baseline (noise scale: the RMS of its residuals on its training part)
and the model converted: `bnnify.convert` (default spec), `bnnify.fit` (training part,
`val=` the validation split, fit defaults unless `--select` varies them; with `--search`
also `search=True`), `bnnify.predict` on the test split, once, with 100 samples. Test
log-likelihood and RMSE are reported in the target's original units; 90% coverage is
that of the central interval of the predictive (`bnnify.bnn.metrics.regression_scores`).

`--select` runs the candidate fit settings of `CANDIDATES` on the first splits and
scores them on their validation splits only: no test index is read. The fit defaults
(README, "Why these defaults") are the candidate with the best mean validation
log-likelihood; `uci_select.json` keeps every score.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import Tensor, nn

import bnnify
from bnnify.bnn.metrics import regression_scores

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("BNNIFY_UCI", ROOT.parent / "shared" / "data" / "uci"))
if not DATA.is_dir():
    DATA = Path("/work/shared/data/uci")
RESULTS = ROOT / "benchmarks" / "results"
DATASETS = {"boston": "bostonHousing", "concrete": "concrete", "energy": "energy", "yacht": "yacht"}
# Published test log-likelihood (mean, standard error) on these splits: mean-field VI and
# MC dropout (Gal and Ghahramani, 2016), deep ensembles of 5 (Lakshminarayanan et al., 2017).
PUBLISHED = {
    "boston": {"vi": (-2.90, 0.07), "mc_dropout": (-2.40, 0.04), "ensemble": (-2.41, 0.25)},
    "concrete": {"vi": (-3.39, 0.02), "mc_dropout": (-2.94, 0.02), "ensemble": (-3.06, 0.18)},
    "energy": {"vi": (-2.39, 0.03), "mc_dropout": (-1.21, 0.01), "ensemble": (-1.38, 0.22)},
    "yacht": {"vi": (-3.43, 0.16), "mc_dropout": (-1.25, 0.08), "ensemble": (-1.18, 0.21)},
}
VAL_FRACTION = 0.2
HIDDEN = 50
SAMPLES = 100
# Fit settings compared by `--select` (on validation splits only).
_EARLY = {"batch_size": 32, "epochs": 1000, "patience": 50}
CANDIDATES = {
    # Round 1: bnnify's defaults before this benchmark, then longer fits with early stopping.
    "lr1e-3_b128_e50": {"lr": 1e-3, "batch_size": 128, "epochs": 50, "patience": 20},
    "lr1e-3_b32_e1000": _EARLY | {"lr": 1e-3},
    "lr3e-3_b32_e1000": _EARLY | {"lr": 3e-3},
    "lr1e-2_b32_e1000": _EARLY | {"lr": 1e-2},
    "lr1e-2_b128_e1000": _EARLY | {"lr": 1e-2, "batch_size": 128},
    "lr3e-3_b32_e1000_kl0.1": _EARLY | {"lr": 3e-3, "kl_weight": 0.1},
    # Round 2, after round 1 found the KL weight mattered most.
    "lr3e-3_b32_e1000_kl0.03": _EARLY | {"lr": 3e-3, "kl_weight": 0.03},
    "lr3e-3_b32_e1000_kl0.01": _EARLY | {"lr": 3e-3, "kl_weight": 0.01},
    "lr1e-2_b32_e1000_kl0.1": _EARLY | {"lr": 1e-2, "kl_weight": 0.1},
}


def load_split(name: str, split: int, test: bool) -> dict[str, Tensor]:
    """The split's training part, validation part and (only with `test`) test part."""
    folder = DATA / DATASETS[name]
    rows = [line.split() for line in (folder / "data.txt").read_text().splitlines()]
    table = torch.tensor([[float(v) for v in row] for row in rows if row], dtype=torch.float64)
    index = [int(float(v)) for v in (folder / f"index_train_{split}.txt").read_text().split()]
    order = torch.tensor(index)[torch.randperm(len(index), generator=_generator(split))]
    n_val = round(VAL_FRACTION * len(order))
    parts = {"train": order[n_val:], "val": order[:n_val]}
    if test:
        parts["test"] = torch.tensor(
            [int(float(v)) for v in (folder / f"index_test_{split}.txt").read_text().split()]
        )
    return {key: table[rows] for key, rows in parts.items()}


def standardised(parts: dict[str, Tensor]) -> tuple[dict[str, tuple[Tensor, Tensor]], float]:
    """Each part as float32 `(x, y)` standardised on the training part, and the target's
    scale (to report in original units)."""
    train = parts["train"]
    mean, std = train.mean(0), train.std(0)
    std[std == 0] = 1.0
    scaled = {key: ((part - mean) / std).float() for key, part in parts.items()}
    pairs = {key: (p[:, :-1].contiguous(), p[:, -1:].contiguous()) for key, p in scaled.items()}
    return pairs, float(std[-1])


def train_network(train: tuple, val: tuple, seed: int, max_epochs: int = 2000) -> nn.Module:
    """The user's network: MSE by Adam, the epoch of best validation MSE (patience 100)."""
    torch.manual_seed(seed)
    x, y = train
    net = nn.Sequential(nn.Linear(x.shape[1], HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = _generator(seed)
    best, kept, best_epoch = math.inf, copy.deepcopy(net.state_dict()), 0
    for epoch in range(max_epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 32):
            index = order[start : start + 32]
            optimizer.zero_grad()
            nn.functional.mse_loss(net(x[index]), y[index]).backward()
            optimizer.step()
        with torch.no_grad():
            score = float(nn.functional.mse_loss(net(val[0]), val[1]))
        if score < best:
            best, kept, best_epoch = score, copy.deepcopy(net.state_dict()), epoch
        elif epoch - best_epoch >= 100:
            break
    net.load_state_dict(kept)
    return net.eval()


def deterministic_scores(net: nn.Module, train: tuple, test: tuple) -> dict[str, float]:
    """The network with a Gaussian noise of the RMS of its training residuals."""
    with torch.no_grad():
        noise = float((net(train[0]) - train[1]).double().square().mean().sqrt())
        return regression_scores(net(test[0])[None], noise, test[1])


def in_units(scores: dict[str, float], scale: float) -> dict[str, float]:
    """Log-likelihood, RMSE and 90% coverage in the target's original units."""
    return {
        "log_likelihood": -scores["nll"] - math.log(scale),
        "rmse": scores["rmse"] * scale,
        "coverage_90": scores["coverage_90"],
    }


def bnnify_run(
    net: nn.Module, data: dict, folder: Path, seed: int, calibrate: bool = False, **settings
) -> dict:
    """convert -> fit -> (predict on the test part, when there is one; with `calibrate`,
    also calibrate on the validation part and predict again)."""
    ckpt = folder / "model.bnn.safetensors"
    if not ckpt.exists():
        bnnify.convert(net, output=ckpt, report=folder / "model.kl.safetensors")
    fitted = folder / f"model.{len(list(folder.iterdir()))}.fit.safetensors"
    result = bnnify.fit(
        ckpt, net, data["train"], val=data["val"], task="regression", seed=seed,
        output=fitted, **settings,
    )  # fmt: skip
    run = {"selection": result.selection, "epochs_run": len(result.history)}
    if result.search is not None:
        run["search_best"] = result.search["points"][result.search["best"]]
    if "test" in data:
        x, y = data["test"]
        predicted = bnnify.predict(fitted, net, x, samples=SAMPLES, keep_samples=True, seed=seed)
        noise = predicted.summary["aleatoric_std"]
        run["scores"] = regression_scores(predicted.tensors["samples"], noise, y)
        if calibrate:
            calibrated = fitted.with_suffix(".cal.safetensors")
            result = bnnify.calibrate(fitted, net, data["val"], output=calibrated, seed=seed)
            run["calibration"] = result.to_json()["bayesian"]
            predicted = bnnify.predict(
                calibrated, net, x, samples=SAMPLES, keep_samples=True, seed=seed
            )
            samples, noise = predicted.tensors["samples"], predicted.summary["aleatoric_std"]
            run["scores_calibrated"] = regression_scores(samples, noise, y)
    return run


def run_split(
    name: str,
    split: int,
    mode: str,
    search: bool,
    candidates: list[str],
    noise: str = "fresh",
    calibrate: bool = False,
) -> dict:
    torch.set_num_threads(1)
    began = time.perf_counter()
    parts, scale = standardised(load_split(name, split, test=mode == "table"))
    net = train_network(parts["train"], parts["val"], seed=split)
    row: dict = {"dataset": name, "split": split}
    with tempfile.TemporaryDirectory(prefix="bnnify-uci-") as tmp:
        folder = Path(tmp)
        if mode == "select":
            row["val_log_likelihood"] = {}
            for key in candidates:
                run = bnnify_run(net, parts, folder, split, **CANDIDATES[key])
                score = run["selection"]["val_log_likelihood"] - math.log(scale)
                row["val_log_likelihood"][key] = score
                row[f"epochs_{key}"] = run["selection"]["kept_epoch"]
        else:
            row["deterministic"] = in_units(
                deterministic_scores(net, parts["train"], parts["test"]), scale
            )
            run = bnnify_run(net, parts, folder, split, calibrate=calibrate, noise=noise)
            row["bnnify"] = in_units(run.pop("scores"), scale)
            if calibrate:
                row["bnnify_calibrated"] = in_units(run.pop("scores_calibrated"), scale)
            row["fit"] = run
            if search:
                run = bnnify_run(net, parts, folder, split, search=True)
                row["bnnify_search"] = in_units(run.pop("scores"), scale)
                row["fit_search"] = run
    row["seconds"] = time.perf_counter() - began
    return row


def mean_se(values: list[float | None]) -> tuple[float, float]:
    values = [v for v in values if v is not None]  # not recorded: see RESULTS.md
    if not values:
        return math.nan, math.nan
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.mean(values), se


def summary(rows: list[dict], models: list[str]) -> dict:
    return {
        model: {
            metric: mean_se([r[model][metric] for r in rows])
            for metric in ("log_likelihood", "rmse", "coverage_90")
        }
        for model in models
    }


def table(results: dict[str, list[dict]], models: list[str]) -> str:
    fmt = "{0:.3f} ± {1:.3f}".format
    lines = [
        "| dataset | model | test LL | RMSE | 90% coverage | LL ≥ MC dropout | "
        "RMSE ≤ deterministic | coverage in 0.88-0.92 |",
        "|" + " --- |" * 8,
    ]
    for name, rows in results.items():
        stats = summary(rows, models)
        det_rmse = stats["deterministic"]["rmse"][0]
        mc = PUBLISHED[name]["mc_dropout"][0]
        for model in models:
            s = stats[model]
            ll, rmse, cov = s["log_likelihood"][0], s["rmse"][0], s["coverage_90"][0]
            checks = (
                ["-", "-", "-"]
                if model == "deterministic"
                else [
                    _yes(ll >= mc),
                    _yes(rmse <= det_rmse),
                    _yes(0.88 <= cov <= 0.92),
                ]
            )
            lines.append(
                f"| {name} ({len(rows)}) | {model} | {fmt(*s['log_likelihood'])} | "
                f"{fmt(*s['rmse'])} | {fmt(*s['coverage_90'])} | " + " | ".join(checks) + " |"
            )
        for key, label in (("vi", "mean-field VI"), ("mc_dropout", "MC dropout")):
            lines.append(
                f"| {name} | {label} (published) | {fmt(*PUBLISHED[name][key])} | | | | | |"
            )
        lines.append(
            f"| {name} | deep ensemble of 5 (published) | {fmt(*PUBLISHED[name]['ensemble'])} "
            "| | | | | |"
        )
    return "\n".join(lines)


def select_table(rows: list[dict], candidates: list[str]) -> tuple[str, str]:
    """Mean validation log-likelihood of each candidate per dataset; the best overall."""
    names = sorted({r["dataset"] for r in rows}, key=list(DATASETS).index)
    means = {
        key: {n: statistics.mean(r["val_log_likelihood"][key] for r in rows if r["dataset"] == n)
              for n in names}
        for key in candidates
    }  # fmt: skip
    overall = {key: statistics.mean(v.values()) for key, v in means.items()}
    best = max(overall, key=overall.__getitem__)
    lines = ["| candidate | " + " | ".join(names) + " | mean |", "|" + " --- |" * (len(names) + 2)]
    for key in candidates:
        cells = " | ".join(f"{means[key][n]:.3f}" for n in names)
        mark = " (best)" if key == best else ""
        lines.append(f"| {key}{mark} | {cells} | {overall[key]:.3f} |")
    return "\n".join(lines), best


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=None, help="first N splits (default 20)")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--jobs", type=int, default=2, help="processes (one thread each)")
    parser.add_argument("--select", action="store_true", help="compare CANDIDATES on validation")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="with --select")
    parser.add_argument("--search", action="store_true", help="also fit with search=True")
    parser.add_argument(
        "--calibrate", action="store_true", help="also calibrate on the validation split"
    )
    parser.add_argument("--noise", default="fresh", help="fit's weight noise: fresh|shifted")
    parser.add_argument(
        "--compile", action="store_true", help="BNNIFY_COMPILE=1: compiled training kernels"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument("--report", type=Path, default=None, help="only redraw the table of a JSON")
    args = parser.parse_args()
    if args.report is not None:
        document = json.loads(args.report.read_text())
        write_results_md(document)
        return
    if args.compile:
        os.environ["BNNIFY_COMPILE"] = "1"  # read by the worker processes
    mode = "select" if args.select else "table"
    splits = args.splits or (3 if args.select else 20)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    jobs = [(name, split) for name in names for split in range(splits)]
    # Read before the run: a package edited on disk meanwhile must not fail the report.
    settings = bnnify.FitSettings(task="regression").__dict__
    defaults = {k: v for k, v in settings.items() if k != "task"}
    began = time.perf_counter()
    rows: list[dict] = []
    with ProcessPoolExecutor(args.jobs) as pool:
        candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
        futures = [
            pool.submit(run_split, n, k, mode, args.search, candidates, args.noise, args.calibrate)
            for n, k in jobs
        ]
        for future in futures:
            row = future.result()
            rows.append(row)
            print(f"{row['dataset']} split {row['split']}: {_brief(row)}", file=sys.stderr)
    seconds = time.perf_counter() - began
    out = args.out or RESULTS / ("uci_select.json" if args.select else "uci.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "protocol": __doc__.split("\n\n", 2)[2].split("`--select`")[0].strip(),
        "splits": splits,
        "seconds": seconds,
        "threads_per_job": 1,
        "jobs": args.jobs,
        "noise": args.noise,
        "compile": args.compile,
        "fit_defaults": defaults,
        "published": PUBLISHED,
    }
    if args.select:
        text, best = select_table(rows, candidates)
        chosen = {key: CANDIDATES[key] for key in candidates}
        document |= {"candidates": chosen, "best": best, "rows": rows}
    else:
        models = ["deterministic", "bnnify"] + (["bnnify_calibrated"] if args.calibrate else [])
        models += ["bnnify_search"] if args.search else []
        results = {n: [r for r in rows if r["dataset"] == n] for n in names}
        text = table(results, models)
        document |= {"summary": {n: summary(r, models) for n, r in results.items()}}
        document |= {"rows": rows}
    out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    if not args.select and args.out is None:
        write_results_md(document)
    print(text)
    print(f"wrote {out} ({seconds:.0f} s)", file=sys.stderr)


def write_results_md(document: dict) -> None:
    """Puts the table of `document` between the markers of RESULTS.md's UCI section."""
    rows = document["rows"]
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    known = ("deterministic", "bnnify", "bnnify_calibrated", "bnnify_search")
    models = [m for m in known if m in rows[0]]
    results = {n: [r for r in rows if r["dataset"] == n] for n in names}
    minutes = document["seconds"] / 60
    text = (
        f"{document['splits']} splits per data set, {document['jobs']} processes of one thread, "
        f"{minutes:.1f} min; mean ± standard error over the splits, test log-likelihood and "
        "RMSE in the target's units. Raw: `benchmarks/results/uci.json`.\n\n"
        + table(results, models)
    )
    path = ROOT / "benchmarks" / "RESULTS.md"
    begin, end = "<!-- uci.py: begin -->", "<!-- uci.py: end -->"
    current = path.read_text()
    head, rest = current.split(begin, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")


def _brief(row: dict) -> str:
    if "val_log_likelihood" in row:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in row["val_log_likelihood"].items())
        return f"validation LL {scores} ({row['seconds']:.0f} s)"
    b, d = row["bnnify"], row["deterministic"]
    return (
        f"bnnify LL {b['log_likelihood']:.3f} RMSE {b['rmse']:.3f} cov {b['coverage_90']:.2f} | "
        f"deterministic LL {d['log_likelihood']:.3f} RMSE {d['rmse']:.3f} "
        f"({row['seconds']:.0f} s)"
    )


if __name__ == "__main__":
    main()
