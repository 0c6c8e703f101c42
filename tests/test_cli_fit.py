"""Tests of `bnnify fit` through the real entry point: JSON history, files, resume, errors."""

from __future__ import annotations

import filecmp
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import flat
from fit_files import (
    argv,
    cli,
    convert_file,
    fit_output,
    run_bnnify,
    save_script,
    shared_fit_files,
    single_thread,
    toy_regression,
)
from safetensors.torch import load_file, save_file
from torch import nn

from bnnify.bnn import kernels
from bnnify.demo import build_model, synthetic_regression
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.data import load_dataset

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

SAMPLES = Path(__file__).resolve().parent.parent / "sample_configs"
RECORD_KEYS = {"epoch", "loss", "nll", "kl", "elbo", "beta", "noise"}


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    return shared_fit_files(tmp_path_factory)


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written to the working directory
    with single_thread():
        yield


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def fit_args(files, out: Path, *extra) -> list:
    """`bnnify fit` of the shared toy checkpoint: 2 epochs of 4 batches, to `out`."""
    template = "fit {ckpt} -m {model} -d {data} --task regression -o {out} --epochs 2"
    paths = {"ckpt": files.reg_ckpt, "model": files.reg_model, "data": files.reg_train}
    return [*argv(template, out=out, **paths), "--batch-size", "128", *extra]


def fit_json(*args) -> dict:
    """The summary of `bnnify fit ARGS --json`, with `history`: its streamed epochs."""
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    return fit_output(result.stdout)


# --------------------------------------------------------------- happy paths


def test_json_history_settings_and_fitted_metadata(files, tmp_path):
    out = tmp_path / "toy.fit.safetensors"
    info = fit_json(*fit_args(files, out, "--epochs", "3", "--val-split", "0.25", "--lr", "0.01"))
    assert info["output"] == str(out)
    assert info["task"] == "regression"
    assert (info["n_train"], info["n_val"]) == (384, 128)
    assert info["settings"]["epochs"] == 3 and info["settings"]["lr"] == 0.01
    history = info["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3] and info["epochs_run"] == 3
    for record in history:
        assert set(record) == RECORD_KEYS | {"val", "improved"}
        assert set(record["val"]) == {"rmse", "log_likelihood"}
        assert record["elbo"] == pytest.approx(-(record["nll"] + record["kl"] / 384))
    assert info["final"] == history[-1]
    kept = info["selection"]["kept_epoch"]
    assert info["kept"] == [info["start"], *history][kept]
    model_sha = hashlib.sha256(files.reg_model.read_bytes()).hexdigest()
    assert info["model"] == {"name": files.reg_model.name, "sha256": model_sha}

    assert listing(tmp_path) == [out.name]
    with Checkpoint(out) as fitted:
        recorded = fitted.fit
        summary_only = ("output", "schema", "search", "epochs_run")
        assert recorded == {k: v for k, v in info.items() if k not in summary_only}
        assert recorded["settings"]["seed"] == 0
        log_noise = fitted.fit_tensors()["bnnify.fit.log_noise"]
        assert math.exp(float(log_noise)) == pytest.approx(info["kept"]["noise"], rel=1e-6)
        with Checkpoint(files.reg_ckpt) as source:
            assert set(fitted.keys()) == set(source.keys()) | {"bnnify.fit.log_noise"}
            assert fitted.parameters.keys() == source.parameters.keys()
            assert fitted.source == source.source


def test_a_validation_file_and_human_output(files, tmp_path):
    x, y = toy_regression(64, seed=9)
    save_file({"x": x, "y": y}, str(tmp_path / "val.safetensors"))
    out = tmp_path / "fit.safetensors"
    result = cli(*fit_args(files, out, "--val", tmp_path / "val.safetensors", "--val-samples", "4"))
    assert result.exit_code == 0, result.output
    assert "Fitted 512 examples for 2 epochs" in result.stdout
    assert "validation rmse" in result.stdout and f"wrote {out}" in flat(result.stdout)
    assert "Fitting 6 Bayesian parameters" in result.stderr
    with Checkpoint(out) as fitted:
        assert fitted.fit["n_val"] == 64
        assert all("val" in record for record in fitted.fit["history"])


@pytest.mark.skipif(
    kernels.compile_refusal(torch.device("cpu")) is not None, reason="torch.compile unavailable"
)
def test_shifted_noise_and_compiled_kernels_from_the_cli(files, tmp_path, monkeypatch):
    monkeypatch.setenv("BNNIFY_COMPILE", "1")  # the toy model is far below the threshold
    results = []
    for noise in ("fresh", "shifted", "shifted"):
        out = tmp_path / f"{noise}-{len(results)}.safetensors"
        results.append(fit_json(*fit_args(files, out, "--noise", noise)))
    assert [r["settings"]["noise"] for r in results] == ["fresh", "shifted", "shifted"]
    assert results[1]["history"] == results[2]["history"]  # seeded: the same run twice
    assert results[0]["history"] != results[1]["history"]  # other noise, other steps
    assert all(math.isfinite(r["final"]["elbo"]) for r in results)
    refused = cli(*fit_args(files, tmp_path / "x.safetensors", "--noise", "cheap"))
    assert refused.exit_code == 2 and "cheap" in refused.output


def test_shifted_noise_on_eager_kernels_says_the_noise_stays_fresh(files, tmp_path, monkeypatch):
    monkeypatch.delenv("BNNIFY_COMPILE", raising=False)  # the toy model is too small
    result = cli(*fit_args(files, tmp_path / "s.safetensors", "--noise", "shifted"))
    assert result.exit_code == 0, result.output
    warning = flat(result.stderr)
    assert "draw fresh noise instead: eager (1153 elements, fewer than the" in warning
    assert "BNNIFY_COMPILE=1 compiles a store of any size" in warning


def test_kl_warmup_rises_linearly_to_one(files, tmp_path):
    args = fit_args(files, tmp_path / "w.safetensors", "--epochs", "5", "--val-split", "0")
    info = fit_json(*args, "--warmup-epochs", "3")
    betas = [record["beta"] for record in info["history"]]
    assert betas == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])
    assert "val" not in info["history"][0]


def test_zero_kl_weight_makes_the_loss_the_nll(files, tmp_path):
    info = fit_json(*fit_args(files, tmp_path / "z.safetensors", "--kl-weight", "0"))
    for record in info["history"]:
        assert record["loss"] == record["nll"]
        assert record["kl"] > 0


def test_same_seed_gives_byte_identical_checkpoints(files, tmp_path):
    paths = [tmp_path / f"{name}.safetensors" for name in ("a", "b", "c")]
    for path, seed in zip(paths, ("3", "3", "4"), strict=True):
        result = cli(*fit_args(files, path, "--seed", seed, "--mc-samples", "2"))
        assert result.exit_code == 0, result.output
    assert filecmp.cmp(paths[0], paths[1], shallow=False)
    assert not filecmp.cmp(paths[0], paths[2], shallow=False)


def test_default_output_and_no_overwrite_without_force(files, tmp_path):
    checkpoint = tmp_path / "toy.bnn.safetensors"
    checkpoint.write_bytes(files.reg_ckpt.read_bytes())
    args = ["fit", checkpoint, "-m", files.reg_model, "-d", files.reg_train, "--task", "regression"]
    result = cli(*args, "--epochs", "1")
    assert result.exit_code == 0, result.output
    default = tmp_path / "toy.bnn.fit.safetensors"
    assert listing(tmp_path) == sorted([checkpoint.name, default.name])
    before = default.read_bytes()

    again = cli(*args, "--epochs", "1", "--seed", "1")
    assert again.exit_code == 2
    assert "already exists" in flat(again.stderr) and "--force" in again.stderr
    assert default.read_bytes() == before
    assert listing(tmp_path) == sorted([checkpoint.name, default.name])

    forced = cli(*args, "--epochs", "1", "--seed", "1", "--force")
    assert forced.exit_code == 0, forced.output
    assert default.read_bytes() != before
    assert listing(tmp_path) == sorted([checkpoint.name, default.name])


def test_resume_continues_history_noise_and_task(files, tmp_path):
    first = tmp_path / "first.safetensors"
    info = fit_json(*fit_args(files, first, "--lr", "0.01", "--val-split", "0"))
    noise = info["final"]["noise"]
    # No --task: the resumed fit's; lr 0: a continued fit keeps the noise it was given.
    template = "fit {first} -m {model} -d {data} -o resumed.safetensors --resume --epochs 3"
    paths = {"first": first, "model": files.reg_model, "data": files.reg_train}
    more = fit_json(*argv(template, **paths), "--lr", "0", "--val-split", "0")
    assert more["task"] == "regression"
    assert [r["epoch"] for r in more["history"]] == [3, 4, 5]  # the epochs run
    assert more["selection"]["start_epoch"] == 2 and more["epochs_run"] == 3
    with Checkpoint(tmp_path / "resumed.safetensors") as resumed:
        assert [r["epoch"] for r in resumed.fit["history"]] == [1, 2, 3, 4, 5]
        assert resumed.fit["history"][:2] == info["history"]
    assert more["final"]["noise"] == pytest.approx(noise, rel=1e-6)
    before, after = load_file(str(first)), load_file("resumed.safetensors")
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        assert torch.equal(tensor, after[key]), key  # lr 0: nothing moved
    fresh = fit_json(
        *fit_args(files, tmp_path / "fresh.safetensors", "--lr", "0", "--val-split", "0")
    )
    assert fresh["final"]["noise"] != pytest.approx(noise, rel=1e-3)

    wrong = cli(*argv(template, **paths), "--task", "classification", "-o", "x.safetensors")
    assert wrong.exit_code == 2
    assert "differs from the resumed fit's task 'regression'" in flat(wrong.stderr)


def test_inspect_and_kl_accept_a_fitted_checkpoint(files, tmp_path):
    out = tmp_path / "fit.safetensors"
    info = fit_json(*fit_args(files, out, "--val-split", "0"))  # the file holds the final epoch
    inspected = cli("inspect", out, "--json")
    assert inspected.exit_code == 0, inspected.output
    data = json.loads(inspected.stdout)
    assert data["fit"]["final"] == info["final"]
    assert data["format"] == "bnnify.variational"
    kl = cli("kl", out, "--json")
    assert kl.exit_code == 0, kl.output
    assert json.loads(kl.stdout)["value"] == pytest.approx(info["final"]["kl"], rel=1e-5)


def test_fit_and_predict_an_arch_state_dict():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_model()
    torch.save(net.state_dict(), "demo.pt")
    spec = SAMPLES / "state_dict_arch.yaml"
    confirm = ["--arch", "bnnify.demo:build_model"]
    confirm += ["--arch-kwargs", '{"hidden": 32, "in_features": 8, "out_features": 1}']
    converted = cli(*argv("convert demo.pt --spec {spec} -o demo.bnn.safetensors", spec=spec))
    assert converted.exit_code == 3, converted.output
    converted = cli(
        *argv("convert demo.pt --spec {spec} -o demo.bnn.safetensors", spec=spec), *confirm
    )
    assert converted.exit_code == 0, converted.output
    x, y = synthetic_regression(96)
    save_file({"x": x, "y": y}, "data.safetensors")
    template = "fit demo.bnn.safetensors -m demo.pt -d data.safetensors --task regression"
    refused = cli(*argv(template), "--epochs", "2", "-o", "demo.fit.safetensors")
    assert refused.exit_code == 3, refused.output
    assert "--arch" in flat(refused.output)
    # The name alone does not confirm the recorded keyword arguments.
    unconfirmed = cli(*argv(template), *confirm[:2], "--epochs", "2", "-o", "d.safetensors")
    assert unconfirmed.exit_code == 3, unconfirmed.output
    assert "--arch-kwargs" in flat(unconfirmed.stderr)
    info = fit_json(*argv(template), *confirm, "--epochs", "2", "-o", "demo.fit.safetensors")
    assert len(info["history"]) == 2
    template = "predict demo.fit.safetensors -m demo.pt -i data.safetensors --samples 4 --json"
    predicted = cli(*argv(template), *confirm)
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.stdout)["summary"]["examples"] == 96


def test_custom_keys_and_a_csv_file(files, tmp_path):
    x, y = toy_regression(40, seed=2)
    save_file({"inputs": x, "targets": y}, str(tmp_path / "d.safetensors"))
    template = "fit {ckpt} -m {model} --task regression --epochs 1"
    toy = argv(template, ckpt=files.reg_ckpt, model=files.reg_model)
    keys = "-d d.safetensors --x-key inputs --y-key targets -o keys.safetensors"
    result = cli(*toy, *argv(keys))
    assert result.exit_code == 0, result.output
    rows = "\n".join(f"{float(b)},{float(a)}" for a, b in zip(x[:, 0], y[:, 0], strict=True))
    (tmp_path / "d.csv").write_text("target,feature\n" + rows + "\n")
    info = fit_json(*toy, *argv("-d d.csv --target target -o csv.safetensors"))
    assert info["n_train"] + info["n_val"] == 40 and info["n_val"] == 4  # 10% by default
    assert math.isfinite(info["final"]["nll"])


@pytest.mark.parametrize("patience", [2, 0])
def test_the_epoch_of_best_validation_log_likelihood_is_the_one_written(files, tmp_path, patience):
    from bnnify.formats.model_files import load_model
    from bnnify.usecases.fitted import make_likelihood
    from bnnify.usecases.runner import open_runner
    from bnnify.usecases.training import FitSettings, validate

    xv, yv = toy_regression(96, seed=5)
    save_file({"x": xv, "y": yv}, str(tmp_path / "val.safetensors"))
    out = tmp_path / "best.safetensors"
    options = ["--epochs", "8", "--lr", "0.05", "--patience", str(patience)]
    info = fit_json(*fit_args(files, out, *options, "--val", tmp_path / "val.safetensors"))
    selection, history = info["selection"], info["history"]
    scores = [info["start"]["val"]["log_likelihood"]] + [
        r["val"]["log_likelihood"] for r in history
    ]
    kept = selection["kept_epoch"]
    assert scores[kept] == max(scores) and selection["criterion"] == "val_log_likelihood"
    assert info["kept"]["val"]["log_likelihood"] == selection["val_log_likelihood"]
    improved = [r["epoch"] for r in history if r["improved"]]
    assert (improved[-1] if improved else 0) == kept
    if selection["stopped_early"]:
        assert patience and selection["last_epoch"] - kept == patience
        assert len(history) == selection["last_epoch"] < 8
    else:
        assert len(history) == 8 and "stopped early" not in selection["reason"]
    # The file holds the kept epoch's state: its validation score, on the same draws.
    settings = FitSettings(**{k: v for k, v in info["settings"].items()})
    with Checkpoint(out) as fitted:
        runner = open_runner(load_model(files.reg_model), fitted)
        likelihood = make_likelihood("regression", fitted, resume=True)
        val = validate(runner, likelihood, load_dataset(tmp_path / "val.safetensors"), settings)
    assert val["log_likelihood"] == pytest.approx(selection["val_log_likelihood"], rel=1e-6)
    assert math.exp(float(likelihood.log_noise.detach())) == pytest.approx(
        info["kept"]["noise"], rel=1e-6
    )


def test_human_output_names_the_kept_epoch_and_why(files, tmp_path):
    result = cli(*fit_args(files, tmp_path / "h.safetensors", "--epochs", "3"))
    assert result.exit_code == 0, result.output
    stdout = flat(result.stdout)
    assert "Fitted 461 examples for 3 epochs; kept epoch" in stdout  # 10% held out
    assert "validation log_likelihood" in stdout
    assert "Kept epoch" in flat(result.stderr) and "validation log-likelihood" in flat(
        result.stderr
    )
    assert "over-fitting" not in result.stderr


def test_without_validation_a_warning_says_nothing_guards_against_over_fitting(files, tmp_path):
    args = fit_args(files, tmp_path / "n.safetensors", "--val-split", "0")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "Warning:" in result.stderr
    assert "no validation data (--val-split 0)" in flat(result.stderr)
    assert "nothing guards against over-fitting" in flat(result.stderr)
    info = fit_json(*fit_args(files, tmp_path / "j.safetensors", "--val-split", "0"))
    assert info["selection"]["criterion"] == "last_epoch" and info["start"] is None
    assert info["kept"] == info["final"] and info["n_val"] == 0


def test_json_lines_stream_one_epoch_a_line_and_print_when_quiet(files, tmp_path):
    result = cli(*fit_args(files, tmp_path / "q.safetensors", "--epochs", "3"), "--json", "-q")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert [json.loads(line)["schema"] for line in lines] == ["bnnify.fit.epoch/1"] * 3 + [
        "bnnify.fit/1"
    ]
    assert fit_output(result.stdout)["epochs_run"] == 3
    assert "Fitting" not in result.stderr  # quiet: no log lines


def test_search_scores_its_grid_on_validation_and_records_it(files, tmp_path):
    from bnnify.usecases.search import grid

    out = tmp_path / "s.safetensors"
    result = cli(*fit_args(files, out, "--epochs", "1", "--search"), "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    points = [line for line in lines if line["schema"] == "bnnify.fit.search_point/1"]
    assert len(points) == len(grid()) == 12
    info = fit_output(result.stdout)
    search = info["search"]
    assert [p["point"] for p in search["points"]] == list(range(12))
    scores = [p["val_log_likelihood"] for p in search["points"]]
    assert scores[search["best"]] == max(scores)
    best = search["points"][search["best"]]
    assert info["settings"]["kl_weight"] == best["kl_weight"]
    assert info["selection"]["val_log_likelihood"] == best["val_log_likelihood"]
    with Checkpoint(out) as fitted:
        assert json.loads(fitted.metadata["bnnify.search"]) == search
        assert fitted.spec.prior[1]["sigma"] == best["prior_scale"]
        assert fitted.spec.posterior[1]["delta"] == best["posterior_delta"]
    human = cli(*fit_args(files, tmp_path / "h.safetensors", "--epochs", "1", "--search"))
    assert "search: best of 12 points" in flat(human.stdout)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--val-split", "0", "--task", "regression"], "validation data, and there is none"),
        (["--resume"], "cannot resume"),
    ],
)
def test_search_needs_validation_and_a_fresh_fit(files, tmp_path, extra, message):
    template = "fit {ckpt} -m {model} -d {data} -o {out} --epochs 1 --search"
    paths = {"ckpt": files.reg_fitted, "model": files.reg_model, "data": files.reg_train}
    result = cli(*argv(template, out=tmp_path / "s.safetensors", **paths), *extra)
    assert result.exit_code == 2
    assert message in flat(result.stderr)
    assert not (tmp_path / "s.safetensors").exists()


def test_a_diverging_fit_exits_1_without_a_summary(files, tmp_path):
    out = tmp_path / "d.safetensors"
    result = cli(*fit_args(files, out, "--lr", "1e30"), "--json")
    assert result.exit_code == 1
    assert "training diverged" in flat(result.stderr)
    assert all(json.loads(line)["schema"] != "bnnify.fit/1" for line in result.stdout.splitlines())
    assert not out.exists()


# --------------------------------------------------------------------- errors


def _poisoned(value: float, index: int, columns: int = 1) -> torch.Tensor:
    tensor = torch.zeros(10, columns)
    tensor[index] = value
    return tensor


GOOD = {"x": torch.zeros(10, 1), "y": torch.zeros(10, 1)}
NO_TASK = "--task"

# name -> (tensors replacing those of GOOD, options, exit code, message)
BAD_DATA = {
    "wrong shape": ({"x": torch.zeros(10, 3)}, [], 1, "inputs of shape (3,)"),
    "nan inputs": ({"x": _poisoned(math.nan, 7)}, [], 1, "inputs has 1 NaN or infinite value"),
    "inf targets": (
        {"y": _poisoned(math.inf, 2)},
        [],
        1,
        "NaN or infinite value(s), first in example 2",
    ),
    "lengths": ({"y": torch.zeros(9, 1)}, [], 1, "10 input examples but 9 targets"),
    "missing key": ({"x": None, "inputs": GOOD["x"]}, [], 1, "no tensor 'x' (found: inputs, y)"),
    "target width": ({"y": torch.zeros(10, 2)}, [], 1, "the targets have 2"),
    "unknown task": ({}, [NO_TASK, "--task", "ranking"], 2, "'ranking' is not one of"),
    "no task": ({}, [NO_TASK], 2, "choose the task with --task regression"),
    "never fitted": ({}, ["--resume"], 2, "was never fitted: there is nothing to resume"),
    "bad validation": ({}, ["--val", "val.safetensors"], 1, "inputs of shape (2,)"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_and_options_exit_cleanly(files, tmp_path, case):
    replaced, options, code, message = BAD_DATA[case]
    options = list(options)
    tensors = {k: v for k, v in {**GOOD, **replaced}.items() if v is not None}
    save_file(tensors, "data.safetensors")
    save_file({"x": torch.zeros(5, 2), "y": torch.zeros(5, 1)}, "val.safetensors")
    args = fit_args(files, tmp_path / "out.safetensors", "-d", "data.safetensors")
    if NO_TASK in options:
        del args[args.index("--task") : args.index("--task") + 2]
        options.remove(NO_TASK)
    before = listing(tmp_path)
    result = cli(*args, *options)
    assert result.exit_code == code, result.output
    assert message in flat(result.output)
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, 1, 2, 3, 0, 1], "class indices must lie in [0, 2] for a model with 3 outputs"),
        ([0.0, 1.5, 2.0, 0.0, 0.0, 1.0], "must be class indices (integers)"),
    ],
)
def test_classification_labels_out_of_range_or_not_integers(files, tmp_path, labels, message):
    save_file({"x": torch.randn(6, 2), "y": torch.tensor(labels)}, "labels.safetensors")
    template = "fit {ckpt} -m {model} -d labels.safetensors --task classification -o out.st"
    result = cli(*argv(template, ckpt=files.cls_ckpt, model=files.cls_model))
    assert result.exit_code == 1
    assert message in flat(result.stderr)
    assert listing(tmp_path) == ["labels.safetensors"]


def test_a_state_dict_without_arch_is_a_usage_error(files, tmp_path):
    net = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    convert_file(tmp_path / "weights.pt", tmp_path / "weights.bnn.safetensors")
    before = listing(tmp_path)
    template = "fit weights.bnn.safetensors -m weights.pt -d {data} --task regression -o out.st"
    result = cli(*argv(template, data=files.reg_train))
    assert result.exit_code == 2
    stderr = flat(result.stderr)
    assert "weights.pt is a state_dict without an architecture, so it cannot be run" in stderr
    assert "Hint:" in stderr and "arch:" in stderr and "TorchScript" in stderr
    assert listing(tmp_path) == before


def test_another_model_file_is_refused_in_a_real_process(files, tmp_path):
    save_script(nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)), tmp_path / "other.pt")
    template = "fit {ckpt} -m other.pt -d {data} --task regression -o out.safetensors --json"
    process = run_bnnify(*argv(template, ckpt=files.reg_ckpt, data=files.reg_train), cwd=tmp_path)
    assert process.returncode == 1, process.stderr
    assert "Traceback" not in process.stderr + process.stdout
    assert process.stdout == ""
    message = flat(process.stderr)
    assert "other.pt does not match the checkpoint" in message and "sha256" in message
    assert "'toy.script.pt'" in message
    assert listing(tmp_path) == ["other.pt"]


def test_labels_of_shape_n_1_fit_and_mismatched_labels_are_refused(files, tmp_path):
    data = load_file(files.cls_train)
    labels = data["y"]
    save_file({"x": data["x"], "y": labels.reshape(-1, 1)}, str(tmp_path / "column.safetensors"))
    save_file({"x": data["x"], "y": torch.stack([labels, labels], 1)}, str(tmp_path / "two.st"))
    base = ["fit", files.cls_ckpt, "-m", files.cls_model, "--task", "classification"]
    fitted = tmp_path / "column.fit.safetensors"
    info = fit_json(*base, "-d", tmp_path / "column.safetensors", "--epochs", "2",
                    "--val-split", "0.2", "-o", fitted)  # fmt: skip
    assert info["final"]["val"]["accuracy"] > 0.8
    assert info["val_estimator"]["estimator"] == "weight_sampling"
    with Checkpoint(fitted) as ckpt:
        assert ckpt.fit["val_estimator"] == info["val_estimator"]
    refused = cli(*base, "-d", tmp_path / "two.st", "-o", tmp_path / "two.fit.safetensors")
    assert refused.exit_code == 1
    assert "labels of shape (270, 2) do not match predictions of shape (270, 3)" in flat(
        refused.stderr
    )
    assert not (tmp_path / "two.fit.safetensors").exists()
