"""The training loop of `fit`: maximise the ELBO with Adam, on one process or several.

Per example, the loss is

    E_q[-log p(y | x, w)]  +  kl_weight * beta(t) * KL(q || p) / N

with N the number of training examples (so the sum over one epoch is the negative
ELBO of the data set, divided by N), the expectation estimated with `mc_samples`
weight samples, and beta(t) a linear warm-up from 0 to 1 over `warmup_epochs`.
Under `torchrun` each process trains on its share of every batch with its own
noise, gradients averaged by DistributedDataParallel.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

import bnnify
from bnnify.bnn.likelihood import (
    CategoricalLikelihood,
    GaussianLikelihood,
    Likelihood,
    classes_last,
)
from bnnify.bnn.metrics import classification_metrics, regression_metrics
from bnnify.enums import NoiseMode, Task
from bnnify.errors import DivergedError, InputError, InvalidArgumentError
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.checkpoint_writer import write_tensors
from bnnify.formats.data import Dataset
from bnnify.formats.safetensors_io import TensorInfo
from bnnify.usecases.runner import Runner

__all__ = [
    "FitSettings",
    "evaluate",
    "make_likelihood",
    "process_device",
    "process_rank",
    "refuse_overflow",
    "save_fitted",
    "settings_json",
    "train",
]


@dataclass
class FitSettings:
    """Settings of a fit (recorded in the fitted checkpoint).

    Raises:
        InvalidArgumentError: For a setting out of its range (`epochs < 1`, `lr < 0`...).
    """

    task: Task
    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 128
    mc_samples: int = 1
    kl_weight: float = 1.0
    warmup_epochs: int = 0
    clip: float | None = 10.0
    seed: int = 0
    val_samples: int = 16
    noise: NoiseMode = NoiseMode.FRESH
    class_dim: int = -1

    def __post_init__(self) -> None:
        self.task = Task.parse(self.task)
        self.noise = NoiseMode.parse(self.noise)
        if isinstance(self.class_dim, bool) or not isinstance(self.class_dim, int):
            raise InvalidArgumentError(f"class_dim must be an integer, got {self.class_dim!r}")
        if self.class_dim == 0:
            raise InvalidArgumentError(
                "class_dim 0 is the batch dimension", hint="Use 1 or more, or -1 for the last."
            )
        lowest = {"epochs": 1, "batch_size": 1, "mc_samples": 1, "val_samples": 1}
        lowest |= {"warmup_epochs": 0, "seed": 0, "lr": 0.0, "kl_weight": 0.0, "clip": 0.0}
        for name, low in lowest.items():
            value = getattr(self, name)
            if name == "clip" and value is None:
                continue
            kinds = (int, float) if isinstance(low, float) else int
            if isinstance(value, bool) or not isinstance(value, kinds):
                kind = "a number" if isinstance(low, float) else "an integer"
                raise InvalidArgumentError(f"{name} must be {kind}, got {value!r}")
            if not (math.isfinite(value) and value >= low):
                raise InvalidArgumentError(f"{name} must be at least {low}, got {value!r}")


def make_likelihood(
    task: Task | str, checkpoint: Checkpoint, resume: bool, class_dim: int = -1
) -> Likelihood:
    """The likelihood of `task`; with `resume`, the noise scale fitted before."""
    if Task.parse(task) is Task.CLASSIFICATION:
        return CategoricalLikelihood(class_dim)
    likelihood = GaussianLikelihood()
    tensors = checkpoint.fit_tensors()
    if resume and "bnnify.fit.log_noise" in tensors:
        with torch.no_grad():
            likelihood.log_noise.copy_(tensors["bnnify.fit.log_noise"])
    return likelihood


def process_rank() -> int:
    """The rank of this process under `torchrun` (0 alone): rank 0 writes the output."""
    return int(os.environ.get("RANK", "0"))


def process_device(device: str) -> str:
    """The device of this process: under torchrun, `cuda` means `cuda:LOCAL_RANK`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
    return device


def _distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        # nccl moves CUDA tensors only; CPU training needs gloo even on a GPU machine.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


class _Objective(nn.Module):
    """Runner and likelihood in one module, so that DDP sees every trained parameter."""

    def __init__(self, runner: Runner, likelihood: Likelihood):
        super().__init__()
        self.runner = runner
        self.likelihood = likelihood

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.runner(inputs)


@torch.no_grad()
def _init_noise(runner: Runner, likelihood: Likelihood, data: Dataset, batch: int) -> None:
    """Starts the noise scale at the RMSE of the mean-weights model on the data."""
    if not isinstance(likelihood, GaussianLikelihood):
        return
    errors = []
    for start in range(0, len(data), batch):
        x, y = data.x[start : start + batch], data.y[start : start + batch]
        out = runner.mean_forward(x)
        errors.append((out.reshape(len(x), -1) - y.reshape(len(y), -1).to(out.dtype)).square())
    rmse = float(torch.cat(errors).mean().sqrt())
    likelihood.log_noise.fill_(math.log(max(rmse, 1e-3)))


def train(
    runner: Runner,
    likelihood: Likelihood,
    train: Dataset,
    settings: FitSettings,
    *,
    val: Dataset | None = None,
    start_epoch: int = 0,
    init_noise: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Fits the posterior of `runner` (and the likelihood's noise) to `train`.

    Returns:
        One record per epoch: loss, nll, kl, elbo (all per example), beta, and the
        validation metrics when `val` is given.
    """
    device = runner.bnn.device
    rank, world = _distributed(device)
    train = Dataset(train.x.to(device), train.y.to(device), train.source)
    torch.manual_seed(settings.seed * 1000 + rank)
    if init_noise:
        _init_noise(runner, likelihood, train, settings.batch_size)
    likelihood.to(device)
    for data in (train, val):
        if data is not None:
            refuse_overflow(runner, likelihood, data, settings.batch_size)
    runner.bnn.noise = settings.noise
    objective: nn.Module = _Objective(runner, likelihood)
    _freeze_deterministic(runner)
    trained = [p for p in objective.parameters() if p.requires_grad]
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(objective)
    optimizer = _adam(trained, settings.lr)
    n = len(train)
    steps = math.ceil(n / settings.batch_size)
    warmup = settings.warmup_epochs * steps
    order_generator = torch.Generator().manual_seed(settings.seed)
    history = []
    for epoch in range(start_epoch, start_epoch + settings.epochs):
        order = torch.randperm(n, generator=order_generator).to(device)
        totals = {"nll": 0.0, "loss": 0.0, "count": 0}
        beta = 1.0
        for step in range(steps):
            index = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            # Equal shares on every process (the last batch loses its remainder, as with
            # DistributedSampler's drop_last): averaged gradients are the batch mean's.
            index = index[: len(index) - len(index) % world][rank::world]
            if len(index) == 0:
                continue
            done = (epoch - start_epoch) * steps + step
            beta = min(1.0, (done + 1) / warmup) if warmup else 1.0
            nll, loss = _step(
                objective, runner, likelihood, train, index, n, beta, settings, optimizer, trained
            )
            if not math.isfinite(loss):
                where = f"epoch {epoch + 1}, step {step + 1}: the loss or its gradient"
                _diverged(f"{where} became infinite or NaN", settings)
            totals["nll"] += nll * len(index)
            totals["loss"] += loss * len(index)
            totals["count"] += len(index)
        if not all(bool(torch.isfinite(p).all()) for p in trained):
            _diverged(f"epoch {epoch + 1}: the parameters became infinite or NaN", settings)
        record = _epoch_record(runner, likelihood, totals, max(totals["count"], 1), beta, epoch, n)
        if val is not None:
            record["val"] = evaluate(
                runner, likelihood, val, settings.val_samples, settings.batch_size
            )
        history.append(record)
        if on_epoch is not None and rank == 0:
            on_epoch(record)
    return history


def _adam(params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam, fused (one kernel per flat tensor) where torch has the fused kernel."""
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def _step(
    objective: nn.Module,
    runner: Runner,
    likelihood: Likelihood,
    data: Dataset,
    index: Tensor,
    n: int,
    beta: float,
    settings: FitSettings,
    optimizer: torch.optim.Optimizer,
    trained: list[Tensor],
) -> tuple[float, float]:
    x, y = data.x[index], data.y[index]
    optimizer.zero_grad(set_to_none=True)
    # A dict of tensors: what DistributedDataParallel knows how to pass on.
    nll = sum(likelihood.nll(objective(x.tensors), y).mean() for _ in range(settings.mc_samples))
    nll = nll / settings.mc_samples
    kl = runner.bnn.kl_divergence().to(nll.dtype)
    loss = nll + settings.kl_weight * beta * kl / n
    loss.backward()
    if settings.clip:
        norm = torch.nn.utils.clip_grad_norm_(trained, settings.clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in trained if p.grad is not None])
    if not _everywhere(torch.isfinite(loss.detach()) & torch.isfinite(norm)):
        return float(nll.detach()), math.nan
    optimizer.step()
    return float(nll.detach()), float(loss.detach())


@torch.no_grad()
def _epoch_record(
    runner: Runner,
    likelihood: Likelihood,
    totals: dict,
    count: float,
    beta: float,
    epoch: int,
    n: int,
) -> dict[str, Any]:
    kl = float(runner.bnn.kl_divergence())
    nll = totals["nll"] / count
    record = {
        "epoch": epoch + 1,
        "loss": totals["loss"] / count,
        "nll": nll,
        "kl": kl,
        "elbo": -(nll + kl / n),
        "beta": beta,
    }
    if isinstance(likelihood, GaussianLikelihood):
        record["noise"] = float(likelihood.noise)
    return record


def _everywhere(finite: Tensor) -> bool:
    """Whether `finite` holds in every process: under torchrun all of them stop together
    (the gradients are averaged already, but each process has its own loss)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        flag = finite.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)
    return bool(finite)


@torch.no_grad()
def refuse_overflow(runner: Runner, likelihood: Likelihood, data: Dataset, batch: int) -> None:
    """Refuses data on which the mean model's output or its loss is infinite or NaN.

    Data are checked to be finite when read, but values near the floating-point limit
    (3.4e38 in float32) still overflow in the model or in the likelihood, and training on
    them can only write NaN.

    Raises:
        InputError: Naming the data and the first batch that overflows.
    """
    for start in range(0, len(data), batch):
        x, y = data.x[start : start + batch], data.y[start : start + batch]
        output = runner.mean_forward(x)
        if torch.isfinite(output).all() and torch.isfinite(likelihood.nll(output, y)).all():
            continue
        largest = data.x.largest()
        raise InputError(
            f"{data.source}: the model's output or loss is infinite or NaN on examples "
            f"{start}-{start + len(x) - 1} (inputs up to {largest:.3g} in magnitude): the "
            "values are too large for the model's floating-point type",
            hint="Standardise the inputs and targets (zero mean, unit variance) first.",
        )


def _diverged(where: str, settings: FitSettings) -> NoReturn:
    raise DivergedError(
        f"training diverged at {where}; nothing was written",
        hint=f"Lower the learning rate (--lr, now {settings.lr:g}), keep gradient clipping "
        "on (--clip), or standardise the inputs and targets.",
    )


def _freeze_deterministic(runner: Runner) -> None:
    """Kept-deterministic parameters stay as converted: only the posterior is fitted."""
    trained = {id(p) for p in runner.bnn.variational_parameters()}
    for param in runner.bnn.parameters():
        if id(param) not in trained:
            param.requires_grad_(False)


@torch.no_grad()
def evaluate(
    runner: Runner, likelihood: Likelihood, data: Dataset, samples: int, batch_size: int
) -> dict[str, float]:
    """Test metrics of the Bayesian model (`samples` weight samples) on `data`."""
    draws = runner.predict_batches(data.x, samples, batch_size)
    if isinstance(likelihood, GaussianLikelihood):
        return regression_metrics(draws, data.y, float(likelihood.noise))
    assert isinstance(likelihood, CategoricalLikelihood)
    logits = classes_last(draws, likelihood.class_dim, leading=1)
    return classification_metrics(logits, data.y)


def save_fitted(
    path: Path,
    temp: Path,
    checkpoint: Checkpoint,
    runner: Runner,
    likelihood: Likelihood,
    info: dict[str, Any],
) -> None:
    """Writes the fitted checkpoint to `temp` (renamed onto `path` by the caller)."""
    tensors: dict[str, Tensor] = {}
    file_keys = checkpoint.state_keys()
    for key, value in runner.bnn.variational_state().items():
        tensors[file_keys.get(key, key)] = value.detach().cpu().contiguous()
    tensors.update({k: v.contiguous() for k, v in checkpoint.deterministic_state().items()})
    if isinstance(likelihood, GaussianLikelihood):
        tensors["bnnify.fit.log_noise"] = likelihood.log_noise.detach().cpu().clone()
    metadata = {k: v for k, v in checkpoint.metadata.items() if k != "total_size"}
    metadata["bnnify.version"] = bnnify.__version__
    metadata["torch.version"] = torch.__version__
    metadata["bnnify.fit"] = _json(info)
    infos = [TensorInfo(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    write_tensors(path, infos, tensors.__getitem__, metadata, lambda final: temp)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def settings_json(settings: FitSettings) -> dict[str, Any]:
    """The settings as a JSON-able dict (recorded in the checkpoint's `bnnify.fit`)."""
    return asdict(settings)
