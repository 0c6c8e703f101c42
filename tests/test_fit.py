"""Tests of bnnify.usecases.fit: `bnnify.fit` from Python, with files or objects in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fit_files import regression_mlp, shared_fit_files, single_thread, toy_regression

import bnnify
from bnnify.enums import Task
from bnnify.errors import InputError, InvalidArgumentError, OutputExistsError, UsageError
from bnnify.formats.checkpoint import Checkpoint
from bnnify.usecases.fit import FitResult

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    return shared_fit_files(tmp_path_factory)


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_fit_from_files_writes_what_it_returns(files, tmp_path):
    out = tmp_path / "fitted.safetensors"
    seen = []
    result = bnnify.fit(
        files.reg_ckpt,
        files.reg_model,
        files.reg_train,
        task="regression",
        epochs=2,
        val_split=0.25,
        output=out,
        on_epoch=seen.append,
    )
    assert isinstance(result, FitResult) and result.output == out
    assert result.task is Task.REGRESSION and result.settings.epochs == 2
    assert (result.n_train, result.n_val) == (384, 128)
    assert result.history == seen and result.final == seen[-1]
    assert set(result.final["val"]) == {"rmse", "log_likelihood"}
    with Checkpoint(out) as fitted:
        assert fitted.fit == json.loads(json.dumps(result.info()))
        assert fitted.fit["model"] == result.model
    data = result.to_json()
    assert data["output"] == str(out) and data["task"] == "regression"
    json.dumps(data)  # the --json output is plain JSON


def test_the_default_output_is_beside_the_checkpoint(files, tmp_path):
    checkpoint = tmp_path / "toy.bnn.safetensors"
    checkpoint.write_bytes(files.reg_ckpt.read_bytes())
    result = bnnify.fit(checkpoint, files.reg_model, files.reg_train, task="regression", epochs=1)
    assert result.output == tmp_path / "toy.bnn.fit.safetensors" and result.output.is_file()
    with pytest.raises(OutputExistsError):
        bnnify.fit(checkpoint, files.reg_model, files.reg_train, task="regression", epochs=1)


def test_a_pipeline_in_memory(tmp_path):
    """An nn.Module and tensors, no model file: convert, fit, predict."""
    x, y = toy_regression(96, seed=3)
    net = regression_mlp().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    converted = bnnify.convert(net, output=tmp_path / "net.bnn.safetensors")
    assert converted.source["format"] == "module"
    fitted = bnnify.fit(converted.outputs[0], net, (x, y), task="regression", epochs=2, lr=0.01)
    prediction = bnnify.predict(fitted.output, net, x, targets=y, samples=4)
    assert prediction.summary["examples"] == 96 and "bayesian" in prediction.metrics
    # The module given is left as it was: still a plain module with its weights.
    assert all(isinstance(p, torch.nn.Parameter) for p in net.parameters())
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])
    other = regression_mlp()
    with pytest.raises(InputError, match="does not match the checkpoint"):
        bnnify.fit(converted.outputs[0], other, (x, y), task="regression", output=tmp_path / "o")


@pytest.mark.parametrize(("n", "val_split", "n_val"), [(9, None, 0), (10, None, 1), (40, 0.0, 0)])
def test_the_default_validation_split_and_the_warning_without_one(
    files, tmp_path, caplog, n, val_split, n_val
):
    x, y = toy_regression(n, seed=4)
    with caplog.at_level("WARNING", logger="bnnify"):
        out = tmp_path / "f.safetensors"
        result = bnnify.fit(files.reg_ckpt, files.reg_model, (x, y), task="regression",
                            epochs=1, val_split=val_split, output=out)  # fmt: skip
    assert (result.n_train, result.n_val) == (n - n_val, n_val)
    warned = "nothing guards against over-fitting" in caplog.text
    assert warned == (n_val == 0)
    assert result.selection["criterion"] == ("last_epoch" if n_val == 0 else "val_log_likelihood")
    if val_split is None and n_val == 0:
        assert "9 examples, too few to split" in caplog.text


def test_task_errors(files, tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(UsageError, match="choose the task"):
        bnnify.fit(files.reg_ckpt, files.reg_model, files.reg_train, output=out)
    with pytest.raises(UsageError, match="nothing to resume"):
        bnnify.fit(files.reg_ckpt, files.reg_model, files.reg_train, resume=True, output=out)
    with pytest.raises(UsageError, match="differs from the resumed fit's task"):
        bnnify.fit(
            files.reg_fitted,
            files.reg_model,
            files.reg_train,
            task="classification",
            resume=True,
            output=out,
        )
    assert not out.exists()


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"lr": -1.0}, "lr must be at least 0"),
        ({"batch_size": 2.5}, "batch_size must be an integer"),
        ({"val_split": 1.0}, r"val_split must be in \[0, 1\)"),
    ],
)
def test_invalid_settings_are_refused_before_any_work(files, tmp_path, setting, match):
    out = tmp_path / "out.safetensors"
    with pytest.raises(InvalidArgumentError, match=match):
        bnnify.fit(
            files.reg_ckpt,
            files.reg_model,
            files.reg_train,
            task="regression",
            output=out,
            **setting,
        )
    assert not out.exists()


def test_resume_continues_the_history(files, tmp_path):
    out = tmp_path / "again.safetensors"
    with Checkpoint(files.reg_fitted) as fitted:
        before = len(fitted.fit["history"])
    result = bnnify.fit(
        files.reg_fitted, files.reg_model, files.reg_train, resume=True, epochs=2, output=out
    )
    assert result.task is Task.REGRESSION
    assert [r["epoch"] for r in result.history[before:]] == [before + 1, before + 2]


def test_fit_confirms_a_recorded_arch_with_its_kwargs(tmp_path):
    from fit_files import convert_file

    from bnnify.demo import build_model
    from bnnify.errors import UnsafeInputError
    from bnnify.formats.spec import resolve_spec

    torch.save(build_model().eval().state_dict(), tmp_path / "demo.pt")
    samples = Path(__file__).resolve().parent.parent / "sample_configs"
    spec = resolve_spec(samples / "state_dict_arch.yaml")
    ckpt = convert_file(tmp_path / "demo.pt", tmp_path / "demo.bnn.safetensors", spec=spec)
    data = (torch.randn(16, 8), torch.randn(16, 1))
    out = tmp_path / "fitted.safetensors"
    with pytest.raises(UnsafeInputError, match="--arch-kwargs"):
        bnnify.fit(ckpt, tmp_path / "demo.pt", data, task="regression", arch=spec.arch, output=out)
    assert not out.exists()
    result = bnnify.fit(
        ckpt,
        tmp_path / "demo.pt",
        data,
        task="regression",
        epochs=1,
        arch=spec.arch,
        arch_kwargs=spec.arch_kwargs,
        output=out,
    )
    assert result.n_train + result.n_val == 16 and out.exists()
