"""Small trained models, their checkpoints and data sets, for the fit and predict tests.

`shared_fit_files` builds them once per pytest session (training and exporting take
seconds): a toy 1-D regression MLP saved as TorchScript and a 3-class classifier of
Gaussian blobs saved as a torch.export program with a dynamic batch dimension, each
converted with the default spec, with training data and a short fit.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from bnnify.formats.model_files import load_model
from bnnify.formats.spec import resolve_spec
from bnnify.usecases.convert import convert

__all__ = [
    "CENTERS",
    "FitFiles",
    "argv",
    "blobs",
    "cli",
    "convert_file",
    "fit_output",
    "regression_mlp",
    "run_bnnify",
    "save_program",
    "save_script",
    "shared_fit_files",
    "single_thread",
    "subprocess_env",
    "toy_regression",
    "train",
]

# Centres of the three classes of `blobs`, each with standard deviation 0.5.
CENTERS = torch.tensor([[0.0, 2.0], [-2.0, -1.0], [2.0, -1.0]])


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread: these models are tiny, and extra threads only add waiting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def subprocess_env() -> dict[str, str]:
    """The environment of a `python -m bnnify` child process (one thread, no colour)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "COLUMNS": "200"}


def fit_output(stdout: str) -> dict:
    """The summary of `bnnify fit --json` (its last JSON line), with `history`: the epochs
    streamed before it, one JSON object per line, each checked to carry its schema first."""
    *epochs, summary = [json.loads(line) for line in stdout.splitlines()]
    assert next(iter(summary)) == "schema" and summary["schema"] == "bnnify.fit/1"
    for epoch in epochs:
        assert next(iter(epoch)) == "schema"
        assert epoch["schema"] in ("bnnify.fit.epoch/1", "bnnify.fit.search_point/1")
    history = [
        {k: v for k, v in e.items() if k != "schema"}
        for e in epochs
        if e["schema"] == "bnnify.fit.epoch/1"
    ]
    return {**summary, "history": history}


def argv(template: str, **values) -> list[str]:
    """`template.split()`, each word `{name}` replaced by `values[name]` (a path or a list)."""
    words = []
    for word in template.split():
        if word[:1] + word[-1:] != "{}":
            words.append(word)
        elif isinstance(values[word[1:-1]], (list, tuple)):
            words += [str(value) for value in values[word[1:-1]]]
        else:
            words.append(str(values[word[1:-1]]))
    return words


def cli(*args):
    """Runs `bnnify ARGS` in this process (Typer's runner); never a traceback."""
    from typer.testing import CliRunner

    from bnnify.cli.main import app

    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert "Traceback" not in result.output, result.output
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def run_bnnify(*args, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """Runs `python -m bnnify ARGS` in a child process (`kwargs` to `subprocess.run`)."""
    return subprocess.run(
        [sys.executable, "-m", "bnnify", *map(str, args)],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        **kwargs,
    )


def toy_regression(n: int, seed: int, low: float = -5.0, high: float = 5.0) -> tuple:
    """`(x, y)` of shape `(n, 1)`: y = sin(1.5 x) + 0.1 noise, x uniform in [low, high]."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=generator) * (high - low) + low
    y = torch.sin(1.5 * x) + 0.1 * torch.randn(n, 1, generator=generator)
    return x, y


def blobs(per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """`(x, labels)`: three Gaussian blobs in 2-D around `CENTERS`."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(per_class)
    x = CENTERS[labels] + 0.5 * torch.randn(3 * per_class, 2, generator=generator)
    return x, labels


def regression_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )


def train(net: nn.Module, x: Tensor, y: Tensor, steps: int, loss_fn, lr: float = 1e-2):
    """Full-batch Adam; returns `net` in eval mode."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(net(x), y).backward()
        optimizer.step()
    return net.eval()


def save_script(net: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated in recent torch
        torch.jit.save(torch.jit.script(net), str(path))
    return path


def save_program(net: nn.Module, example: Tensor, path: Path) -> Path:
    """A torch.export program of an `nn.Sequential`, with a dynamic batch dimension."""
    batch = torch.export.Dim("batch")
    program = torch.export.export(net, (example[:4],), dynamic_shapes={"input": {0: batch}})
    buffer = io.BytesIO()  # torch.export.save warns about paths not ending in ".pt2"
    torch.export.save(program, buffer)
    path.write_bytes(buffer.getvalue())
    return path


def convert_file(model: Path, checkpoint: Path, spec=None, **flags) -> Path:
    """Converts `model` into `checkpoint` (and a KL report beside it) with the library.

    The test's own `spec` is trusted: its `arch` is confirmed.
    """
    report = checkpoint.with_name(checkpoint.name.replace(".safetensors", ".kl.safetensors"))
    spec = spec or resolve_spec(None, **flags)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load
        with load_model(model) as loaded:
            convert(
                loaded,
                spec,
                output=checkpoint,
                report=report,
                arch=spec.arch,
                arch_kwargs=spec.arch_kwargs,
            )
    return checkpoint


# FitFiles attribute -> file name in its folder.
_FILES = {
    "reg_model": "toy.script.pt",
    "reg_ckpt": "toy.bnn.safetensors",
    "reg_train": "toy.train.safetensors",
    "reg_fitted": "toy.fit.safetensors",
    "cls_model": "blobs.pt2",
    "cls_ckpt": "blobs.bnn.safetensors",
    "cls_train": "blobs.train.safetensors",
    "cls_test": "blobs.test.safetensors",
    "cls_fitted": "blobs.fit.safetensors",
}


@dataclass
class FitFiles:
    """Paths of the shared files (`files.reg_model`, ...: see `_FILES`); never modify them."""

    folder: Path

    def __getattr__(self, name: str) -> Path:
        if name not in _FILES:
            raise AttributeError(name)
        return self.folder / _FILES[name]


def _short_fit(folder: Path, model: Path, prefix: str, task: str, epochs: int, lr: float) -> None:
    from bnnify.formats.checkpoint import Checkpoint
    from bnnify.formats.data import load_dataset
    from bnnify.usecases.fitted import make_likelihood, save_fitted
    from bnnify.usecases.runner import open_runner
    from bnnify.usecases.training import FitSettings, train

    with Checkpoint(folder / f"{prefix}.bnn.safetensors") as ckpt:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            runner = open_runner(load_model(model), ckpt)
        likelihood = make_likelihood(task, ckpt, resume=False)
        data = load_dataset(folder / f"{prefix}.train.safetensors")
        settings = FitSettings(task=task, epochs=epochs, lr=lr, batch_size=64)
        history = train(runner, likelihood, data, settings).history
        info = {"task": task, "history": history, "final": history[-1]}
        target = folder / f"{prefix}.fit.safetensors"
        save_fitted(target, target, ckpt, runner, likelihood, info)


def build_fit_files(folder: Path) -> FitFiles:
    """Trains, saves, converts and briefly fits both models (global RNG left as it was)."""
    with torch.random.fork_rng(devices=[]), single_thread():
        torch.manual_seed(0)
        x, y = toy_regression(512, seed=0)
        net = train(regression_mlp(), x, y, 800, nn.functional.mse_loss)
        save_script(net, folder / "toy.script.pt")
        save_file({"x": x, "y": y}, str(folder / "toy.train.safetensors"))
        convert_file(folder / "toy.script.pt", folder / "toy.bnn.safetensors")

        xc, labels = blobs(100, seed=0)
        classifier = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))
        train(classifier, xc, labels, 300, nn.functional.cross_entropy)
        save_program(classifier, xc, folder / "blobs.pt2")
        save_file({"x": xc, "y": labels}, str(folder / "blobs.train.safetensors"))
        xt, lt = blobs(50, seed=1)
        save_file({"x": xt, "y": lt}, str(folder / "blobs.test.safetensors"))
        convert_file(folder / "blobs.pt2", folder / "blobs.bnn.safetensors")

        files = FitFiles(folder)
        _short_fit(folder, files.reg_model, "toy", "regression", epochs=20, lr=0.02)
        _short_fit(folder, files.cls_model, "blobs", "classification", epochs=20, lr=0.01)
    return files


_SHARED: dict[str, FitFiles] = {}


def shared_fit_files(tmp_path_factory) -> FitFiles:
    """`build_fit_files` once per pytest session, shared by every test module that asks."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _SHARED:
        _SHARED[key] = build_fit_files(tmp_path_factory.mktemp("fit_files"))
    return _SHARED[key]
