"""Digits classification benchmark through the Python API: calibration and OOD detection.

    make bench-digits          # installs scikit-learn (benchmark only), then runs this
    python benchmarks/digits.py [--quick] [--seeds 5]

scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes) are the data;
scikit-learn is needed by this script only, never by bnnify or its tests. Per seed:

- Calibration: a random 60/20/20 train/validation/test split of all ten classes.
- Out-of-distribution: classes 0-4 are in distribution (the same split of them),
  classes 5-9 of the test part are held out as OOD inputs.

Each experiment trains a small MLP (64-100-100-C, early stopping on validation NLL),
then runs `bnnify.convert`, `bnnify.fit` (classification, validation data given),
`bnnify.calibrate` (on the validation part) and `bnnify.predict` (test targets, `ood`).
Every choice (epochs of the network, the KL weight of the fit from a small grid) is
made on the validation part; the test part is used once, for the table. Baselines:
the deterministic network, and the same with temperature scaling fitted on the
validation part (`bnnify.bnn.calibration.fit_temperature`). Metrics are those of
`bnnify.bnn.metrics` for every model.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import bnnify
from bnnify.bnn.calibration import fit_temperature
from bnnify.bnn.metrics import classification_scores, ood_detection
from bnnify.errors import InputError
from bnnify.formats.plots import reliability_diagram

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "digits.json"
FIGURE = ROOT / "docs" / "images" / "digits_reliability.png"
METRICS = ("accuracy", "nll", "brier", "ece")
SETTINGS = {
    "hidden": 100,
    "det_max_epochs": 300,
    "det_lr": 1e-3,
    "det_weight_decay": 1e-4,
    "fit_epochs": 100,
    "fit_lr": 1e-3,
    "fit_batch_size": 64,
    "kl_weights": [1.0, 0.1, 0.01],  # chosen per seed by validation NLL
    "samples": 32,
}


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


def split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a, b = round(0.6 * n), round(0.8 * n)
    return order[:a], order[a:b], order[b:]


def train_network(x, y, x_val, y_val, classes: int, seed: int) -> tuple[nn.Module, int]:
    """Adam with weight decay; the epoch of the best validation NLL is kept."""
    torch.manual_seed(seed)
    hidden = SETTINGS["hidden"]
    net = nn.Sequential(
        nn.Linear(x.shape[1], hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )
    optimizer = torch.optim.Adam(
        net.parameters(), lr=SETTINGS["det_lr"], weight_decay=SETTINGS["det_weight_decay"]
    )
    generator = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch = math.inf, None, 0
    for epoch in range(1, SETTINGS["det_max_epochs"] + 1):
        net.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            index = order[start : start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x[index]), y[index]).backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            nll = float(nn.functional.cross_entropy(net(x_val), y_val))
        if nll < best:
            best, best_epoch = nll, epoch
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return net.eval(), best_epoch


def deterministic_rows(net, x_val, y_val, x_test, y_test) -> tuple[dict, dict, float]:
    with torch.no_grad():
        val_logits, test_logits = net(x_val), net(x_test)
    temperature = fit_temperature(val_logits[None], y_val).value
    plain = classification_scores(test_logits.double().softmax(-1), y_test)
    tempered = classification_scores((test_logits.double() / temperature).softmax(-1), y_test)
    return plain, tempered, temperature


def bnn_pipeline(net, folder: Path, train, val, test, seed: int, ood=None) -> dict:
    """convert, fit (KL weight by validation NLL), calibrate, predict: the API throughout."""
    ckpt = folder / "model.bnn.safetensors"
    bnnify.convert(net, output=ckpt, report=folder / "model.kl.safetensors", seed=seed)
    fits = {}
    for kl_weight in SETTINGS["kl_weights"]:
        fits[kl_weight] = bnnify.fit(
            ckpt,
            net,
            train,
            task="classification",
            val=val,
            epochs=SETTINGS["fit_epochs"],
            lr=SETTINGS["fit_lr"],
            batch_size=SETTINGS["fit_batch_size"],
            kl_weight=kl_weight,
            seed=seed,
            output=folder / f"model.kl{kl_weight}.fit.safetensors",
        )
    chosen = min(fits, key=lambda w: -fits[w].final["val"]["log_likelihood"])
    fitted = fits[chosen].output
    options = dict(targets=test[1], samples=SETTINGS["samples"], seed=seed, ood=ood)
    before = bnnify.predict(fitted, net, test[0], **options)
    try:
        calibrated = bnnify.calibrate(fitted, net, val, samples=SETTINGS["samples"], seed=seed)
    except InputError as error:  # separable validation labels: no temperature to fit
        print(f"seed {seed}: {error}", file=sys.stderr)
        calibrated, after = None, before
    else:
        after = bnnify.predict(calibrated.output, net, test[0], **options)
    return {
        "kl_weight": chosen,
        "val_nll_by_kl_weight": {
            str(w): -f.final["val"]["log_likelihood"] for w, f in fits.items()
        },
        "temperature": None if calibrated is None else calibrated.calibration.values["bayesian"],
        "bnn": _pick(before.metrics["bayesian"]),
        "bnn_calibrated": _pick(after.metrics["bayesian"]),
        "ood": before.ood.get("bayesian"),
        "ood_calibrated": after.ood.get("bayesian"),
        "probs": after.tensors["probs"],
    }


def _pick(metrics: dict) -> dict:
    return {key: metrics[key] for key in METRICS}


def calibration_experiment(x, y, seed: int, workdir: Path, figure: bool) -> dict:
    train, val, test = split(len(x), seed)
    net, epochs = train_network(x[train], y[train], x[val], y[val], 10, seed)
    plain, tempered, temperature = deterministic_rows(net, x[val], y[val], x[test], y[test])
    folder = workdir / f"calibration_{seed}"
    folder.mkdir()
    bnn = bnn_pipeline(
        net, folder, (x[train], y[train]), (x[val], y[val]), (x[test], y[test]), seed
    )
    if figure and seed == 0:
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        reliability_diagram(bnn["probs"], y[test], FIGURE, force=True)
    bnn.pop("probs")
    return {
        "det_epochs": epochs,
        "det": _pick(plain),
        "det_temperature": {**_pick(tempered), "temperature": temperature},
        **bnn,
    }


def ood_experiment(x, y, seed: int, workdir: Path) -> dict:
    train, val, test = split(len(x), seed)
    inside = [index[y[index] < 5] for index in (train, val, test)]
    outside = test[y[test] >= 5]
    train, val, test = inside
    net, _ = train_network(x[train], y[train], x[val], y[val], 5, seed)
    with torch.no_grad():
        det = ood_detection(net(x[test])[None], net(x[outside])[None])
    folder = workdir / f"ood_{seed}"
    folder.mkdir()
    bnn = bnn_pipeline(
        net,
        folder,
        (x[train], y[train]),
        (x[val], y[val]),
        (x[test], y[test]),
        seed,
        ood=x[outside],
    )
    return {
        "in_distribution": len(test),
        "out_of_distribution": len(outside),
        "det_max_softmax": det["max_softmax"],
        "det_entropy": det["predictive_entropy"],
        "bnn": bnn["ood"],
        "bnn_calibrated": bnn["ood_calibrated"],
        "temperature": bnn["temperature"],
    }


def mean_se(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return {"mean": mean, "se": se}


def summarise(runs: list[dict]) -> dict:
    rows = {}
    for model in ("det", "det_temperature", "bnn", "bnn_calibrated"):
        rows[model] = {m: mean_se([r["calibration"][model][m] for r in runs]) for m in METRICS}
    ood = {
        "det_max_softmax": mean_se([r["ood"]["det_max_softmax"]["auroc"] for r in runs]),
        "det_entropy": mean_se([r["ood"]["det_entropy"]["auroc"] for r in runs]),
    }
    for model in ("bnn", "bnn_calibrated"):
        for score in ("max_softmax", "predictive_entropy", "mutual_information"):
            values = [r["ood"][model][score]["auroc"] for r in runs]
            ood[f"{model}_{score}"] = mean_se(values)
    return {"calibration": rows, "ood_auroc": ood}


def markdown(summary: dict, seeds: int) -> str:
    names = {
        "det": "deterministic network",
        "det_temperature": "deterministic + temperature scaling",
        "bnn": "bnnify (fitted, uncalibrated)",
        "bnn_calibrated": "bnnify (fitted + `calibrate`)",
    }
    lines = [
        f"| model (test, {seeds} seeds, mean ± s.e.) | accuracy | NLL | Brier | ECE (15 bins) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for model, row in summary["calibration"].items():
        cells = [f"{row[m]['mean']:.4f} ± {row[m]['se']:.4f}" for m in METRICS]
        lines.append(f"| {names[model]} | " + " | ".join(cells) + " |")
    lines += ["", "| OOD score (classes 5-9 held out) | AUROC |", "| --- | --- |"]
    labels = {
        "det_max_softmax": "deterministic, max softmax",
        "det_entropy": "deterministic, entropy",
        "bnn_max_softmax": "bnnify, max softmax",
        "bnn_predictive_entropy": "bnnify, predictive entropy",
        "bnn_mutual_information": "bnnify, mutual information",
        "bnn_calibrated_max_softmax": "bnnify + `calibrate`, max softmax",
        "bnn_calibrated_predictive_entropy": "bnnify + `calibrate`, predictive entropy",
        "bnn_calibrated_mutual_information": "bnnify + `calibrate`, mutual information",
    }
    for key, label in labels.items():
        value = summary["ood_auroc"][key]
        lines.append(f"| {label} | {value['mean']:.4f} ± {value['se']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 fit epochs")
    args = parser.parse_args()
    if args.quick:
        args.seeds, SETTINGS["fit_epochs"] = 1, 20
    torch.set_num_threads(1)
    x, y = load_digits()
    runs = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.seeds):
            run = {
                "seed": seed,
                "calibration": calibration_experiment(x, y, seed, Path(folder), not args.quick),
                "ood": ood_experiment(x, y, seed, Path(folder)),
            }
            print(json.dumps(run), flush=True)
            runs.append(run)
    summary = summarise(runs)
    result = {
        "settings": SETTINGS,
        "seeds": args.seeds,
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "summary": summary,
        "runs": runs,
    }
    if not args.quick:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(summary, args.seeds))


if __name__ == "__main__":
    main()
