"""Tests of bnnify.usecases.training: the ELBO loop, KL weighting and warm-up, noise, saving."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fit_files import convert_file, save_program, shared_fit_files, single_thread
from torch import nn

from bnnify.bnn.likelihood import CategoricalLikelihood, GaussianLikelihood
from bnnify.errors import DivergedError, InputError
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.data import Dataset, load_dataset
from bnnify.formats.model_files import load_model
from bnnify.usecases.fitted import make_likelihood, save_fitted
from bnnify.usecases.runner import open_runner
from bnnify.usecases.training import FitSettings, evaluate, settings_json, train

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    return shared_fit_files(tmp_path_factory)


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def open_toy(files, checkpoint=None):
    ckpt = Checkpoint(checkpoint or files.reg_ckpt)
    runner = open_runner(load_model(files.reg_model), ckpt)
    return ckpt, runner


def subset(data: Dataset, n: int) -> Dataset:
    return Dataset(data.x[:n], data.y[:n], data.source)


def test_history_has_one_record_per_epoch(files):
    _, runner = open_toy(files)
    data = subset(load_dataset(files.reg_train), 128)
    val = Dataset(data.x[:32], data.y[:32], "val")
    seen = []
    settings = FitSettings(task="regression", epochs=3, lr=0.01, batch_size=32)
    training = train(runner, GaussianLikelihood(), data, settings, val=val, on_epoch=seen.append)
    history = training.history
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert seen == history
    for record in history:
        assert set(record) == {
            "epoch",
            "loss",
            "nll",
            "kl",
            "elbo",
            "beta",
            "noise",
            "val",
            "improved",
        }
        assert record["elbo"] == pytest.approx(-(record["nll"] + record["kl"] / 128))
        assert set(record["val"]) == {"rmse", "log_likelihood"}
        assert record["kl"] > 0 and record["noise"] > 0


@pytest.mark.parametrize("kl_weight", [0.5, 2.0])
def test_loss_is_nll_plus_weighted_warmed_up_kl_per_example(files, kl_weight):
    # With lr = 0 nothing moves, so every step's KL is the same and the epoch's loss is
    # nll + kl_weight * mean(beta over its steps) * KL / N, beta rising by 1/8 per step.
    _, runner = open_toy(files)
    data = subset(load_dataset(files.reg_train), 64)
    settings = FitSettings(
        task="regression", epochs=3, lr=0.0, batch_size=16, kl_weight=kl_weight, warmup_epochs=2
    )
    history = train(runner, GaussianLikelihood(), data, settings).history
    kl = float(runner.bnn.kl_divergence().detach())
    mean_betas = [sum(range(1, 5)) / 4 / 8, sum(range(5, 9)) / 4 / 8, 1.0]
    for record, beta in zip(history, mean_betas, strict=True):
        assert record["kl"] == pytest.approx(kl)
        expected = record["nll"] + kl_weight * beta * kl / 64
        assert record["loss"] == pytest.approx(expected, rel=1e-5)
    assert [r["beta"] for r in history] == pytest.approx([0.5, 1.0, 1.0])


def test_zero_kl_weight_makes_the_loss_the_nll(files):
    _, runner = open_toy(files)
    data = subset(load_dataset(files.reg_train), 64)
    settings = FitSettings(task="regression", epochs=2, lr=0.01, batch_size=16, kl_weight=0.0)
    for record in train(runner, GaussianLikelihood(), data, settings).history:
        assert record["loss"] == record["nll"]


def test_noise_starts_at_the_rmse_of_the_mean_model(files):
    _, runner = open_toy(files)
    data = subset(load_dataset(files.reg_train), 100)
    with torch.no_grad():
        rmse = float((runner.mean_forward(data.x) - data.y).square().mean().sqrt())
    likelihood = GaussianLikelihood()
    train(runner, likelihood, data, FitSettings(task="regression", epochs=1, lr=0.0))
    assert float(likelihood.noise.detach()) == pytest.approx(rmse, rel=1e-5)
    kept = GaussianLikelihood(noise=0.5)
    settings = FitSettings(task="regression", epochs=1, lr=0.0)
    train(runner, kept, data, settings, init_noise=False)
    assert float(kept.noise.detach()) == pytest.approx(0.5)


def test_same_seed_same_fit_and_another_seed_another(files):
    def run(seed):
        _, runner = open_toy(files)
        data = subset(load_dataset(files.reg_train), 64)
        settings = FitSettings(task="regression", epochs=2, lr=0.01, batch_size=16, seed=seed)
        history = train(runner, GaussianLikelihood(), data, settings).history
        return history, runner.bnn.variational[0].mu.detach().clone()

    first, mu_first = run(3)
    again, mu_again = run(3)
    other, mu_other = run(4)
    assert first == again and torch.equal(mu_first, mu_again)
    assert first != other and not torch.equal(mu_first, mu_other)


def test_fitting_improves_the_elbo_of_the_toy_problem(files):
    _, runner = open_toy(files)
    data = load_dataset(files.reg_train)
    settings = FitSettings(task="regression", epochs=15, lr=0.02, batch_size=128)
    history = train(runner, GaussianLikelihood(), data, settings).history
    assert history[-1]["elbo"] > history[0]["elbo"]
    assert history[-1]["kl"] < history[0]["kl"]


def test_parameters_kept_deterministic_are_not_trained(tmp_path):
    net = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 1)).eval()
    x = torch.randn(40, 2)
    model = save_program(net, x, tmp_path / "net.pt2")
    ckpt = convert_file(model, tmp_path / "net.bnn.safetensors", exclude=["2.bias"])
    with Checkpoint(ckpt) as checkpoint:
        runner = open_runner(load_model(model), checkpoint)
        before = runner.bnn.module.get_parameter("2.bias").detach().clone()
        mu_before = runner.bnn.variational[0].mu.detach().clone()
        data = Dataset(x, x.sum(1, keepdim=True), "sum")
        train(runner, GaussianLikelihood(), data, FitSettings(task="regression", epochs=3, lr=0.05))
    assert torch.equal(runner.bnn.module.get_parameter("2.bias"), before)
    assert not torch.equal(runner.bnn.variational[0].mu, mu_before)


def test_classification_fit_and_evaluation(files):
    with Checkpoint(files.cls_ckpt) as ckpt:
        runner = open_runner(load_model(files.cls_model), ckpt)
        likelihood = make_likelihood("classification", ckpt, resume=False)
        assert isinstance(likelihood, CategoricalLikelihood)
        data = load_dataset(files.cls_train)
        test = load_dataset(files.cls_test)
        settings = FitSettings(task="classification", epochs=2, lr=0.01, batch_size=100)
        history = train(runner, likelihood, data, settings, val=test).history
    assert "noise" not in history[-1]
    metrics = history[-1]["val"]
    assert set(metrics) == {"accuracy", "log_likelihood", "ece"}
    assert metrics["accuracy"] > 0.9
    assert metrics["log_likelihood"] < 0 and 0 <= metrics["ece"] <= 1
    again = evaluate(runner, likelihood, test, samples=8, batch_size=7)
    assert again["accuracy"] == pytest.approx(metrics["accuracy"], abs=0.05)


def test_save_fitted_round_trip(files, tmp_path):
    ckpt, runner = open_toy(files)
    likelihood = GaussianLikelihood()
    data = subset(load_dataset(files.reg_train), 64)
    settings = FitSettings(task="regression", epochs=1, lr=0.01)
    history = train(runner, likelihood, data, settings).history
    info = {"task": "regression", "settings": settings_json(settings), "history": history}
    target = tmp_path / "fitted.safetensors"
    save_fitted(target, target, ckpt, runner, likelihood, info)
    with Checkpoint(target) as fitted:
        assert set(fitted.keys()) == set(ckpt.keys()) | {"bnnify.fit.log_noise"}
        assert fitted.fit == json.loads(json.dumps(info))
        assert fitted.fit["settings"]["lr"] == 0.01
        noise = math.exp(float(fitted.fit_tensors()["bnnify.fit.log_noise"]))
        assert noise == pytest.approx(float(likelihood.noise.detach()))
        state = fitted.variational_state()
        for key, value in runner.bnn.variational_state().items():
            assert torch.equal(state[key], value)
        resumed = make_likelihood("regression", fitted, resume=True)
        assert float(resumed.noise.detach()) == pytest.approx(noise)
        fresh = make_likelihood("regression", fitted, resume=False)
        assert float(fresh.noise.detach()) == 1.0


@pytest.mark.parametrize("clip", [10.0, None])
def test_a_diverging_fit_stops_before_a_non_finite_step(files, clip):
    _, runner = open_toy(files)
    before = {k: v.clone() for k, v in runner.bnn.variational_state().items()}
    data = subset(load_dataset(files.reg_train), 64)
    settings = FitSettings(task="regression", epochs=3, lr=1e30, batch_size=32, clip=clip)
    seen = []
    with pytest.raises(DivergedError, match="training diverged at epoch 1") as error:
        train(runner, GaussianLikelihood(), data, settings, on_epoch=seen.append)
    assert "--lr, now 1e+30" in error.value.hint and error.value.exit_code == 1
    assert seen == []  # stopped inside the first epoch
    after = runner.bnn.variational_state()
    assert all(torch.isfinite(t).all() for t in after.values())  # no non-finite step taken
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("where", ["train", "val"])
def test_data_that_overflow_the_model_are_refused(files, where):
    _, runner = open_toy(files)
    good = subset(load_dataset(files.reg_train), 64)
    huge = Dataset(
        good.x.tensors["x"] / good.x.tensors["x"].abs().max() * 3e38, good.y, "huge.safetensors"
    )
    assert torch.isfinite(
        huge.x.tensors["x"]
    ).all()  # finite data, yet the model's output overflows
    data, val = (huge, good) if where == "train" else (good, huge)
    settings = FitSettings(task="regression", epochs=1, batch_size=32)
    with pytest.raises(InputError, match=r"huge\.safetensors: the model's output or loss"):
        train(runner, GaussianLikelihood(), data, settings, val=val)
