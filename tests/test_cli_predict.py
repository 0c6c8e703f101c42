"""Tests of `bnnify predict` through the real entry point, and the issue's end-to-end checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import flat
from fit_files import (
    CENTERS,
    argv,
    cli,
    convert_file,
    regression_mlp,
    run_bnnify,
    save_script,
    shared_fit_files,
    single_thread,
    toy_regression,
    train,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

REGRESSION_KEYS = {"mean", "std", "epistemic_std", "aleatoric_std"}
CLASSIFICATION_KEYS = {
    "probs",
    "predicted",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
}


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    return shared_fit_files(tmp_path_factory)


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written to the working directory
    with single_thread():
        yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """20 inputs of the toy regression, from -6 to 6 (outside the data at both ends)."""
    path = tmp_path_factory.mktemp("inputs") / "grid.safetensors"
    save_file({"x": torch.linspace(-6, 6, 20).unsqueeze(1)}, str(path))
    return path


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def predict_json(*args) -> dict:
    result = cli("predict", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ------------------------------------------------------------- end to end


def test_toy_regression_is_uncertain_away_from_its_data(tmp_path, request):
    """Train, save TorchScript, convert, fit, predict: the spread grows outside [-5, 5]."""
    seed = request.config.getoption("--seed")
    torch.manual_seed(seed)
    x, y = toy_regression(512, seed=seed)
    net = train(regression_mlp(), x, y, 800, nn.functional.mse_loss)
    save_script(net, tmp_path / "toy.pt")
    save_file({"x": x, "y": y}, str(tmp_path / "train.safetensors"))
    grid = torch.linspace(-8.5, 8.5, 171).unsqueeze(1)
    save_file({"x": grid}, str(tmp_path / "grid.safetensors"))

    converted = cli("convert", tmp_path / "toy.pt", "--json")
    assert converted.exit_code == 0, converted.output
    template = "fit toy.bnn.safetensors -m toy.pt -d train.safetensors --task regression"
    options = f"--epochs 500 --lr 0.03 --batch-size 128 --seed {seed} --json"
    fitted = run_bnnify(*argv(template), *argv(options), cwd=tmp_path)
    assert fitted.returncode == 0, fitted.stderr
    assert "Traceback" not in fitted.stderr
    info = json.loads(fitted.stdout)
    assert info["output"] == "toy.bnn.fit.safetensors" and len(info["history"]) == 500
    template = "toy.bnn.fit.safetensors -m toy.pt -i grid.safetensors --samples 64"
    summary = predict_json(*argv(template), "--out", "preds.safetensors")
    assert summary["output"] == "preds.safetensors"
    std = load_file(str(tmp_path / "preds.safetensors"))["std"].flatten()
    where = grid.flatten()
    outside = std[(where <= -6.5) | (where >= 6.5)].mean()
    inside = std[where.abs() <= 4].mean()
    assert outside >= 2 * inside, (float(outside), float(inside))
    # The fitted noise is of the order of the true 0.1, not the whole spread.
    assert 0.05 < info["final"]["noise"] < 0.3


def test_blobs_are_more_uncertain_far_away_with_calibration_metrics(files, tmp_path, request):
    seed = str(request.config.getoption("--seed"))
    template = "fit {ckpt} -m {model} -d {data} --task classification -o blobs.fit.safetensors"
    paths = {"ckpt": files.cls_ckpt, "model": files.cls_model, "data": files.cls_train}
    options = f"--epochs 50 --lr 0.01 --batch-size 100 --seed {seed}"
    fitted = cli(*argv(template, **paths), *argv(options))
    assert fitted.exit_code == 0, fitted.output
    test = load_file(str(files.cls_test))
    save_file({"x": test["x"]}, str(tmp_path / "near.safetensors"))
    save_file({"labels": test["y"]}, str(tmp_path / "labels.safetensors"))
    angle = torch.linspace(0, 2 * math.pi, 101)[:-1]
    far = 10 * torch.stack([angle.cos(), angle.sin()], 1)
    assert torch.cdist(far, CENTERS).min() > 7
    save_file({"x": far}, str(tmp_path / "far.safetensors"))

    common = [tmp_path / "blobs.fit.safetensors", "-m", files.cls_model, "--samples", "64"]
    common += ["--seed", seed]
    near = predict_json(
        *common, "-i", tmp_path / "near.safetensors", "--labels", tmp_path / "labels.safetensors"
    )
    away = predict_json(*common, "-i", tmp_path / "far.safetensors")
    assert near["summary"]["task"] == "classification"  # the fitted task, without --task
    mi_near = near["summary"]["mean_mutual_information"]
    mi_far = away["summary"]["mean_mutual_information"]
    assert mi_far > 2 * mi_near, (mi_near, mi_far)
    assert away["metrics"] == {}

    metrics = near["metrics"]
    assert set(metrics) == {"bayesian", "mean_weights"}
    for model in metrics.values():
        assert {"accuracy", "log_likelihood", "ece"} <= set(model)
        assert model["accuracy"] > 0.95
        assert model["log_likelihood"] < 0 and 0 <= model["ece"] < 0.2
    table = cli(
        "predict",
        *common,
        "-i",
        tmp_path / "near.safetensors",
        "--labels",
        tmp_path / "labels.safetensors",
    )
    assert table.exit_code == 0
    assert "bayesian" in table.stdout and "mean weights" in table.stdout and "ece" in table.stdout


# ------------------------------------------------------------------ outputs


def toy(files, inputs, checkpoint=None) -> list[str]:
    """`CHECKPOINT -m MODEL -i INPUTS` of the shared toy regression (fitted by default)."""
    paths = {"ckpt": checkpoint or files.reg_fitted, "model": files.reg_model, "x": inputs}
    return argv("{ckpt} -m {model} -i {x}", **paths)


def test_regression_output_file(files, inputs, tmp_path):
    data = predict_json(*toy(files, inputs), "--samples", "8", "-o", "p.safetensors")
    assert data["summary"]["samples"] == 8 and data["summary"]["task"] == "regression"
    tensors = load_file("p.safetensors")
    assert set(tensors) == REGRESSION_KEYS
    assert all(t.shape == (20, 1) for t in tensors.values())
    squares = tensors["epistemic_std"] ** 2 + tensors["aleatoric_std"] ** 2
    assert torch.allclose(tensors["std"] ** 2, squares)
    noise = data["summary"]["aleatoric_std"]
    assert noise > 0 and torch.allclose(tensors["aleatoric_std"], torch.full((20, 1), noise))
    with safe_open("p.safetensors", framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["bnnify.format"] == "bnnify.predictions"
    assert metadata["bnnify.task"] == "regression" and metadata["bnnify.samples"] == "8"
    assert metadata["bnnify.checkpoint"] == files.reg_fitted.name


def test_kept_samples_and_seeds(files, inputs):
    base = [*toy(files, inputs), "--samples", "5", "--keep-samples"]
    predict_json(*base, "-o", "a.safetensors")
    predict_json(*base, "-o", "b.safetensors")
    predict_json(*base, "--seed", "1", "-o", "c.safetensors")
    a, b, c = (load_file(f"{n}.safetensors") for n in "abc")
    assert a["samples"].shape == (5, 20, 1)
    assert torch.allclose(a["mean"], a["samples"].mean(0))
    assert torch.equal(a["samples"], b["samples"])
    assert not torch.equal(a["samples"], c["samples"])


def test_mean_weights_are_deterministic_with_the_noise_only(files, inputs):
    base = [*toy(files, inputs), "--mean-weights"]
    first = predict_json(*base, "--seed", "1", "-o", "a.safetensors")
    predict_json(*base, "--seed", "2", "-o", "b.safetensors")
    a, b = (load_file(f"{n}.safetensors") for n in "ab")
    for key in REGRESSION_KEYS:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(a["epistemic_std"], torch.zeros(20, 1))
    noise = first["summary"]["aleatoric_std"]
    assert torch.allclose(a["std"], torch.full((20, 1), noise))
    assert first["summary"]["samples"] == 1 and first["summary"]["mean_weights"] is True


def test_batches_agree_in_distribution(files, inputs):
    base = [*toy(files, inputs), "--samples", "400"]
    predict_json(*base, "-o", "one.safetensors")
    predict_json(*base, "--batch-size", "7", "-o", "parts.safetensors")
    one, parts = (load_file(f"{n}.safetensors") for n in ("one", "parts"))
    # Each batch draws its own weights: means agree within 5 standard errors, spreads
    # within 5 relative standard errors of a standard deviation estimate.
    error = math.sqrt(2 / 400) * one["epistemic_std"]
    assert ((one["mean"] - parts["mean"]).abs() <= 5 * error).all()
    ratio = parts["epistemic_std"] / one["epistemic_std"]
    assert ((ratio - 1).abs() < 5 / math.sqrt(400)).all()
    predict_json(*toy(files, inputs), "--mean-weights", "-o", "m1.safetensors")
    predict_json(*toy(files, inputs), "--mean-weights", "--batch-size", "7", "-o", "m7.safetensors")
    m1, m7 = (load_file(f"{n}.safetensors") for n in ("m1", "m7"))
    assert torch.allclose(m1["mean"], m7["mean"], atol=1e-6)


def test_classification_output_file(files):
    paths = {"ckpt": files.cls_fitted, "model": files.cls_model, "x": files.cls_test}
    template = "{ckpt} -m {model} -i {x} --samples 6 --keep-samples -o p.safetensors"
    data = predict_json(*argv(template, **paths))
    tensors = load_file("p.safetensors")
    assert set(tensors) == CLASSIFICATION_KEYS | {"samples"}
    assert tensors["samples"].shape == (6, 150, 3)
    assert torch.allclose(tensors["probs"].sum(1), torch.ones(150, dtype=torch.float64))
    assert torch.equal(tensors["predicted"], tensors["probs"].argmax(1))
    total = tensors["expected_entropy"] + tensors["mutual_information"]
    assert torch.allclose(tensors["predictive_entropy"], total)
    assert data["summary"]["class_counts"] == torch.bincount(tensors["predicted"]).tolist()
    assert data["metrics"] == {}  # `y` in the input file is not read without --labels


def test_a_converted_checkpoint_warns_that_the_spread_is_epistemic(files, inputs):
    result = cli("predict", *toy(files, inputs, files.reg_ckpt), "-o", "p.safetensors")
    assert result.exit_code == 0, result.output
    assert "Warning:" in result.stderr
    assert "the predictive spread is the epistemic part only" in flat(result.stderr)
    tensors = load_file("p.safetensors")
    assert torch.equal(tensors["aleatoric_std"], torch.zeros(20, 1))
    assert torch.equal(tensors["std"], tensors["epistemic_std"])
    quiet = cli("predict", *toy(files, inputs, files.reg_ckpt), "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""


def test_numpy_and_csv_inputs_and_targets(files):
    x = np.linspace(-3, 3, 12).reshape(12, 1)  # float64, as numpy saves by default
    np.save("x.npy", x)
    Path("y.csv").write_text("y\n" + "\n".join(str(np.sin(1.5 * v)) for v in x[:, 0]))
    data = predict_json(*toy(files, "x.npy"), "--targets", "y.csv")
    assert data["summary"]["examples"] == 12
    assert set(data["metrics"]) == {"bayesian", "mean_weights"}
    assert {"rmse", "mae", "nll", "crps", "coverage_90"} <= set(data["metrics"]["bayesian"])
    assert data["metrics"]["mean_weights"]["rmse"] < 0.5


def test_prediction_in_a_real_process(files, inputs, tmp_path):
    options = argv("--samples 4 --json -o p.safetensors")
    process = run_bnnify("predict", *toy(files, inputs), *options, cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert json.loads(process.stdout)["summary"]["examples"] == 20
    assert listing(tmp_path) == ["p.safetensors"]


# ------------------------------------------------------------------- errors


@pytest.fixture
def bad_files(tmp_path):
    nan = torch.zeros(6, 1)
    nan[5] = float("nan")
    save_file({"x": torch.zeros(4, 3)}, "wide.safetensors")
    save_file({"x": nan}, "nan.safetensors")
    save_file({"inputs": torch.zeros(4, 1)}, "keys.safetensors")
    save_file({"y": torch.tensor([0, 1, 5])}, "labels.safetensors")
    save_file({"x": torch.zeros(3, 2)}, "three.safetensors")
    save_script(nn.Sequential(nn.Linear(1, 1)), tmp_path / "other.pt")
    torch.save(nn.Sequential(nn.Linear(1, 1)).state_dict(), "weights.pt")
    convert_file(tmp_path / "weights.pt", tmp_path / "weights.bnn.safetensors")
    from multi_input_models import TwoHeads

    save_script(TwoHeads(features=1), tmp_path / "heads.pt")
    convert_file(tmp_path / "heads.pt", tmp_path / "heads.bnn.safetensors")
    Path("exists.safetensors").write_bytes(b"keep")
    return tmp_path


# name -> (arguments, exit code, message); {reg}: the shared toy regression's fitted
# checkpoint and model, {x}: good inputs for it, {cls}: the shared blobs classifier's.
BAD = {
    "wrong shape": ("{reg} -i wide.safetensors", 1, "inputs of shape (3,) per example"),
    "nan inputs": ("{reg} -i nan.safetensors", 1, "NaN or infinite value(s), first in example 5"),
    "missing key": ("{reg} -i keys.safetensors", 1, "no tensor 'x' (found: inputs)"),
    "other model": ("{fitted} -m other.pt -i {x}", 1, "does not match the checkpoint"),
    "unknown task": ("{reg} -i {x} --task ranking", 2, "'ranking' is not one of"),
    "output exists": ("{reg} -i {x} -o exists.safetensors", 2, "already exists"),
    "no samples": ("{reg} -i {x} --samples 0", 2, "--samples"),
    "labels": ("{cls} -i three.safetensors --labels labels.safetensors", 1, "must lie in [0, 2]"),
    "no arch": ("weights.bnn.safetensors -m weights.pt -i {x}", 2, "save the model as TorchScript"),
    "two outputs": ("heads.bnn.safetensors -m heads.pt -i {x}", 1, "returns a tuple of 2"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_errors_exit_cleanly_without_output(files, inputs, bad_files, case):
    template, code, message = BAD[case]
    reg = [files.reg_fitted, "-m", files.reg_model]
    cls = [files.cls_fitted, "-m", files.cls_model]
    args = argv(template, reg=reg, cls=cls, fitted=files.reg_fitted, x=inputs)
    if "-o" not in args:
        args += ["-o", "out.safetensors"]
    before = listing(bad_files)
    result = cli("predict", *args)
    assert result.exit_code == code, result.output
    assert message in flat(result.output)
    assert listing(bad_files) == before
    assert Path("exists.safetensors").read_bytes() == b"keep"


# ------------------------------- per-token classification, and the estimator


def independent_scores(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict:
    """Accuracy, NLL and ECE over every position, by explicit loops (not bnnify's code)."""
    rows = probs.reshape(-1, probs.shape[-1]).double().tolist()
    targets = labels.reshape(-1).tolist()
    n = len(rows)
    pairs = list(zip(rows, targets, strict=True))
    correct = [max(range(len(p)), key=p.__getitem__) == t for p, t in pairs]
    ece = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = [i for i, p in enumerate(rows) if (b == 0 or max(p) > low) and max(p) <= high]
        if inside:
            accuracy = sum(correct[i] for i in inside) / len(inside)
            confidence = sum(max(rows[i]) for i in inside) / len(inside)
            ece += len(inside) / n * abs(accuracy - confidence)
    return {
        "accuracy": sum(correct) / n,
        "nll": -sum(math.log(p[t]) for p, t in pairs) / n,
        "ece": ece,
    }


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A per-token classifier `(batch, 5, 4) -> (batch, 5, 3)` as a .pt2, and its data."""
    from fit_files import save_program
    from multi_input_models import token_classifier

    folder = tmp_path_factory.mktemp("tokens")
    torch.manual_seed(3)
    net = token_classifier().eval()
    x = torch.randn(24, 5, 4)
    with torch.no_grad():
        labels = (net(x) + 0.5 * torch.randn(24, 5, 3)).argmax(-1)
    model = save_program(net, x, folder / "tokens.pt2")
    ckpt = convert_file(model, folder / "tokens.bnn.safetensors")
    save_file({"x": x, "y": labels}, str(folder / "data.safetensors"))
    save_file({"x": x, "y": labels[:, 0].contiguous()}, str(folder / "wrong.safetensors"))
    return model, ckpt, folder / "data.safetensors", folder / "wrong.safetensors", labels


def test_per_token_classification_fit_predict_and_metrics(tokens, tmp_path):
    model, ckpt, data, wrong, labels = tokens
    fitted = tmp_path / "tokens.fit.safetensors"
    fit = cli("fit", ckpt, "-m", model, "-d", data, "--task", "classification", "--epochs", "2",
              "--val-split", "0.25", "-o", fitted, "--json")  # fmt: skip
    assert fit.exit_code == 0, fit.output
    info = json.loads(fit.stdout)
    assert set(info["final"]["val"]) == {"accuracy", "log_likelihood", "ece"}
    assert info["val_estimator"]["estimator"] == "weight_sampling"

    out = tmp_path / "p.safetensors"
    result = cli("predict", fitted, "-m", model, "-i", data, "--labels", data, "--samples", "8",
                 "--batch-size", "10", "-o", out, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    tensors = load_file(out)
    assert tensors["probs"].shape == (24, 5, 3) and tensors["predicted"].shape == (24, 5)
    assert tensors["mutual_information"].shape == (24, 5)
    summary = report["summary"]
    assert summary["examples"] == 24 and summary["positions"] == 120
    counts = torch.bincount(tensors["predicted"].reshape(-1), minlength=3).tolist()
    assert summary["class_counts"] == counts and sum(counts) == 120
    expected = independent_scores(tensors["probs"], labels)
    metrics = report["metrics"]["bayesian"]
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name
    assert metrics["log_likelihood"] == pytest.approx(-expected["nll"], abs=1e-9)

    refused = cli("predict", fitted, "-m", model, "-i", data, "--labels", wrong)
    assert refused.exit_code == 1
    assert "labels of shape (24,) do not match predictions of shape (24, 5, 3)" in flat(
        refused.stderr
    )
    refused = cli("fit", ckpt, "-m", model, "-d", wrong, "--task", "classification", "-o",
                  tmp_path / "no.safetensors")  # fmt: skip
    assert refused.exit_code == 1 and "labels of shape (24,) do not match" in flat(refused.stderr)
    assert not (tmp_path / "no.safetensors").exists()


def test_predict_reports_its_estimator_everywhere(tokens, tmp_path):
    model, ckpt, data, _, _ = tokens
    out = tmp_path / "p.safetensors"
    human = cli("predict", ckpt, "-m", model, "-i", data, "--task", "classification", "-o", out)
    assert human.exit_code == 0, human.output
    assert "estimator: weight_sampling (" in flat(human.stdout)
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["bnnify.estimator"] == "weight_sampling"
    # An export program's layers are graph nodes, not nn.Linear modules: no proof.
    assert "not the weight or bias of a plain nn.Linear" in metadata["bnnify.estimator_reason"]

    # An nn.Sequential MLP through `arch`: the local trick is proven to be the same.
    from multi_input_models import mlp

    from bnnify.formats.spec import resolve_spec

    torch.save(mlp().state_dict(), tmp_path / "mlp.pt")
    spec = resolve_spec({"arch": "multi_input_models:mlp"})
    ckpt = convert_file(tmp_path / "mlp.pt", tmp_path / "mlp.bnn.safetensors", spec=spec)
    save_file({"x": torch.randn(16, 8)}, str(tmp_path / "x.safetensors"))
    args = [ckpt, "-m", tmp_path / "mlp.pt", "-i", tmp_path / "x.safetensors", "--arch", spec.arch]
    result = cli("predict", *args, "--json", "-o", tmp_path / "q.safetensors")
    assert result.exit_code == 0, result.output
    estimator = json.loads(result.stdout)["summary"]["estimator"]
    assert estimator["estimator"] == "local_reparameterization"
    assert "nn.Sequential of row-wise layers" in estimator["reason"]
    with safe_open(str(tmp_path / "q.safetensors"), "pt") as handle:
        assert handle.metadata()["bnnify.estimator"] == "local_reparameterization"
    human = cli("predict", *args)
    assert "estimator: local_reparameterization (" in flat(human.stdout)
    mean = cli("predict", *args, "--mean-weights", "--json")
    assert json.loads(mean.stdout)["summary"]["estimator"]["estimator"] == "posterior_mean"
