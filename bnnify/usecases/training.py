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

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from bnnify.bnn.likelihood import (
    CategoricalLikelihood,
    GaussianLikelihood,
    Likelihood,
    classes_last,
)
from bnnify.bnn.metrics import classification_metrics, regression_metrics
from bnnify.enums import NoiseMode, Task
from bnnify.errors import DivergedError, InputError, InvalidArgumentError
from bnnify.formats.data import Dataset
from bnnify.usecases.best_epoch import BestEpoch, last_epoch
from bnnify.usecases.distributed import everywhere, join
from bnnify.usecases.runner import Runner
from bnnify.usecases.seeding import seeded

__all__ = [
    "FitSettings",
    "Training",
    "evaluate",
    "refuse_overflow",
    "settings_json",
    "train",
    "validate",
]


@dataclass
class FitSettings:
    """Settings of a fit (recorded in the fitted checkpoint).

    The defaults are `bnnify fit`'s, chosen on validation splits of UCI regression data
    (README, "Why these defaults").

    Raises:
        InvalidArgumentError: For a setting out of its range (`epochs < 1`, `lr < 0`...).
    """

    task: Task
    epochs: int = 1000
    lr: float = 1e-2
    batch_size: int = 32
    mc_samples: int = 1
    kl_weight: float = 0.1
    warmup_epochs: int = 0
    clip: float | None = 10.0
    seed: int = 0
    val_samples: int = 16
    noise: NoiseMode = NoiseMode.FRESH
    patience: int = 50
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
        lowest |= {"warmup_epochs": 0, "patience": 0, "seed": 0, "lr": 0.0, "kl_weight": 0.0}
        lowest |= {"clip": 0.0}
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


@dataclass
class Training:
    """What `train` did.

    Attributes:
        history: One record per epoch run: loss, nll, kl, elbo (per example), beta,
            noise (regression), and with validation data `val` (metrics) and
            `improved` (the best so far).
        selection: Which epoch's state the model holds now, and why (see `BestEpoch`).
        start: The starting state's `epoch`, `val` metrics and `noise` (regression),
            None without validation.
    """

    history: list[dict[str, Any]]
    selection: dict[str, Any]
    start: dict[str, Any] | None = None


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
) -> Training:
    """Fits the posterior of `runner` (and the likelihood's noise) to `train`.

    With `val`, the state of the epoch of best validation log-likelihood (the
    starting state included) is restored at the end, and the fit stops after
    `settings.patience` epochs without improvement. Without it, the last epoch is kept.
    """
    device = runner.bnn.device
    rank, world = join(device)
    train = Dataset(train.x.to(device), train.y.to(device), train.source)
    torch.manual_seed(settings.seed * 1000 + rank)
    if init_noise:
        _init_noise(runner, likelihood, train, settings.batch_size)
    likelihood.to(device)
    for data in (train, val):
        if data is not None:
            refuse_overflow(runner, likelihood, data, settings.batch_size)
    loop = _Loop(runner, likelihood, train, settings, start_epoch, (rank, world))
    start, best = None, None
    if val is not None:
        start = {"epoch": start_epoch, "val": validate(runner, likelihood, val, settings)}
        if isinstance(likelihood, GaussianLikelihood):
            start["noise"] = float(likelihood.noise.detach())
        score = start["val"]["log_likelihood"]
        best = BestEpoch(loop.trained, settings.patience, start_epoch, score)
    history = []
    for epoch in range(start_epoch, start_epoch + settings.epochs):
        record = loop.epoch(epoch)
        if best is not None:
            record["val"] = validate(runner, likelihood, val, settings)
            record["improved"] = best.consider(epoch + 1, record["val"]["log_likelihood"])
        history.append(record)
        if on_epoch is not None and rank == 0:
            on_epoch(record)
        if best is not None and not everywhere(torch.tensor(not best.exhausted)):
            break
    if best is None:
        return Training(history, last_epoch(start_epoch, start_epoch + len(history)))
    best.restore()
    return Training(history, best.summary(), start)


class _Loop:
    """Adam on the posterior and the noise scale, one pass over the data at a time."""

    def __init__(
        self,
        runner: Runner,
        likelihood: Likelihood,
        data: Dataset,
        settings: FitSettings,
        start_epoch: int,
        process: tuple[int, int],
    ):
        self.runner, self.likelihood, self.data, self.settings = runner, likelihood, data, settings
        self.start_epoch = start_epoch
        self.rank, self.world = process
        runner.bnn.noise = settings.noise
        self.objective: nn.Module = _Objective(runner, likelihood)
        _freeze_deterministic(runner)
        self.trained = [p for p in self.objective.parameters() if p.requires_grad]
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.objective = DistributedDataParallel(self.objective)
        self.optimizer = _adam(self.trained, settings.lr)
        self.steps = math.ceil(len(data) / settings.batch_size)
        self.warmup = settings.warmup_epochs * self.steps
        self.order = torch.Generator().manual_seed(settings.seed)

    def epoch(self, epoch: int) -> dict[str, Any]:
        """Trains for one epoch; returns its record (per-example loss, nll, kl, elbo...)."""
        settings, n, world = self.settings, len(self.data), self.world
        order = torch.randperm(n, generator=self.order).to(self.data.y.device)
        totals = {"nll": 0.0, "loss": 0.0, "count": 0}
        beta = 1.0
        for step in range(self.steps):
            index = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            # Equal shares on every process (the last batch loses its remainder, as with
            # DistributedSampler's drop_last): averaged gradients are the batch mean's.
            index = index[: len(index) - len(index) % world][self.rank :: world]
            if len(index) == 0:
                continue
            done = (epoch - self.start_epoch) * self.steps + step
            beta = min(1.0, (done + 1) / self.warmup) if self.warmup else 1.0
            nll, loss = self._step(index, beta)
            if not math.isfinite(loss):
                where = f"epoch {epoch + 1}, step {step + 1}: the loss or its gradient"
                _diverged(f"{where} became infinite or NaN", settings)
            totals["nll"] += nll * len(index)
            totals["loss"] += loss * len(index)
            totals["count"] += len(index)
        if not all(bool(torch.isfinite(p).all()) for p in self.trained):
            _diverged(f"epoch {epoch + 1}: the parameters became infinite or NaN", settings)
        count = max(totals["count"], 1)
        return _epoch_record(self.runner, self.likelihood, totals, count, beta, epoch, n)

    def _step(self, index: Tensor, beta: float) -> tuple[float, float]:
        settings, likelihood = self.settings, self.likelihood
        x, y = self.data.x[index], self.data.y[index]
        self.optimizer.zero_grad(set_to_none=True)
        # A dict of tensors: what DistributedDataParallel knows how to pass on.
        draws = range(settings.mc_samples)
        nll = sum(likelihood.nll(self.objective(x.tensors), y).mean() for _ in draws)
        nll = nll / settings.mc_samples
        kl = self.runner.bnn.kl_divergence().to(nll.dtype)
        loss = nll + settings.kl_weight * beta * kl / len(self.data)
        loss.backward()
        if settings.clip:
            norm = torch.nn.utils.clip_grad_norm_(self.trained, settings.clip)
        else:
            grads = [p.grad for p in self.trained if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
        if not everywhere(torch.isfinite(loss.detach()) & torch.isfinite(norm)):
            return float(nll.detach()), math.nan
        self.optimizer.step()
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


def validate(
    runner: Runner, likelihood: Likelihood, data: Dataset, settings: FitSettings
) -> dict[str, float]:
    """`evaluate` with the same weight noise at every call, apart from the training noise.

    Seeded from `settings.seed` in a forked generator: the training noise stream is the
    same with or without validation, and epochs are compared on the same draws (their
    differences are the posterior's, not the luck of the draw).
    """
    with seeded(settings.seed, "validation", runner.bnn.device):
        return evaluate(runner, likelihood, data, settings.val_samples, settings.batch_size)


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


def settings_json(settings: FitSettings) -> dict[str, Any]:
    """The settings as a JSON-able dict (recorded in the checkpoint's `bnnify.fit`)."""
    return asdict(settings)


def _adam(params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam, fused (one kernel per flat tensor) where torch has the fused kernel."""
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)
