"""`fit`: variational fine-tuning of a checkpoint's posterior on data (maximise the ELBO).

Per example, the loss is

    E_q[-log p(y | x, w)]  +  kl_weight * beta(t) * KL(q || p) / N

with N the number of training examples (so the sum over one epoch is the negative
ELBO of the data set, divided by N), the expectation estimated with `mc_samples`
weight samples, and beta(t) a linear warm-up from 0 to 1 over `warmup_epochs`.
The loop itself, and its distributed form under `torchrun`, is in `training`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bnnify.bnn.likelihood import Likelihood
from bnnify.enums import NoiseMode, Task
from bnnify.errors import InputError, InvalidArgumentError, UsageError
from bnnify.formats.atomic import AtomicOutputs
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.data import Dataset
from bnnify.formats.spec import resolve_device
from bnnify.usecases import LOGGER_NAME
from bnnify.usecases.model_call import model_arguments
from bnnify.usecases.runner import Runner, check_input, open_runner
from bnnify.usecases.sources import (
    CheckpointLike,
    DataLike,
    ModelLike,
    as_checkpoint,
    as_dataset,
    derived_name,
    file_paths,
    opened_model,
    path_of,
)
from bnnify.usecases.training import (
    FitSettings,
    make_likelihood,
    process_device,
    process_rank,
    save_fitted,
    settings_json,
    train,
)

__all__ = ["FitResult", "FitSettings", "fit"]

logger = logging.getLogger(LOGGER_NAME)


@dataclass
class FitResult:
    """What a fit did (what `bnnify fit` prints, and records in the fitted checkpoint).

    Attributes:
        output: The fitted checkpoint (written by the process of rank 0 only).
        task: The task fitted.
        settings: The settings used.
        n_train: Training examples.
        n_val: Validation examples (0 without validation).
        data: Name of the training data.
        model: `{"name": ..., "sha256": ...}` of the model file.
        history: One record per epoch, those of the fits resumed included: loss,
            nll, kl, elbo (per example), beta, noise, and `val` metrics.
        inputs: The names of the model's per-example inputs, in order.
        model_args: The constant arguments of the model's `forward`.
        call: What each parameter of `forward` received (`"input NAME"` or a constant).
        val_estimator: How the validation predictions were sampled
            (`{"estimator": ..., "reason": ...}`), None without validation.
    """

    output: Path
    task: Task
    settings: FitSettings
    n_train: int
    n_val: int
    data: str
    model: dict[str, str]
    history: list[dict[str, Any]]
    inputs: list[str] = field(default_factory=lambda: ["x"])
    model_args: dict[str, Any] = field(default_factory=dict)
    call: dict[str, Any] = field(default_factory=dict)
    val_estimator: dict[str, str] | None = None

    @property
    def final(self) -> dict[str, Any]:
        """The record of the last epoch."""
        return self.history[-1]

    def info(self) -> dict[str, Any]:
        """The fit's record in the checkpoint's metadata (`bnnify.fit`)."""
        return {
            "task": self.task.value,
            "settings": settings_json(self.settings),
            "n_train": self.n_train,
            "n_val": self.n_val,
            "data": self.data,
            "model": self.model,
            "inputs": self.inputs,
            "model_args": self.model_args,
            "call": self.call,
            "val_estimator": self.val_estimator,
            "history": self.history,
            "final": self.final,
        }

    def to_json(self) -> dict[str, Any]:
        """The result as `bnnify fit --json` prints it."""
        return {"output": str(self.output), **self.info()}


def fit(
    checkpoint: CheckpointLike,
    model: ModelLike,
    data: DataLike,
    *,
    task: Task | str | None = None,
    val: DataLike | None = None,
    val_split: float = 0.0,
    epochs: int = 50,
    lr: float = 1e-3,
    batch_size: int = 128,
    mc_samples: int = 1,
    kl_weight: float = 1.0,
    warmup_epochs: int = 0,
    clip: float | None = 10.0,
    seed: int = 0,
    val_samples: int = 16,
    noise: NoiseMode | str = NoiseMode.FRESH,
    class_dim: int | None = None,
    x_key: str | Sequence[str] = "x",
    y_key: str = "y",
    target: str | None = None,
    model_args: Mapping[str, Any] | Sequence[str] | None = None,
    output: str | Path | None = None,
    resume: bool = False,
    device: str | None = None,
    arch: str | None = None,
    arch_kwargs: str | Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    force: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Fits a checkpoint's posterior to data and writes the fitted checkpoint, atomically.

    Under `torchrun --nproc_per_node=N` each process trains on its share of every
    batch (DistributedDataParallel: gloo on CPU, nccl on GPU); rank 0 writes.

    Args:
        checkpoint: The checkpoint to fit (a file or a `Checkpoint`).
        model: The model it was converted from (a file, `LoadedModel` or `nn.Module`).
        data: Training data: a file (safetensors `x`/`y`, .npz, CSV), a `Dataset`
            or a tuple `(x, y)`, `x` a tensor or tensors by name (several inputs).
        task: "regression" (Gaussian likelihood, learned noise) or "classification"
            (logits); default: the task of a resumed fit.
        val: Validation data, as `data`.
        val_split: Fraction of `data` held out for validation instead.
        epochs: Passes over the data.
        lr: Adam's learning rate.
        batch_size: Examples per step.
        mc_samples: Weight samples per step for the expected NLL.
        kl_weight: Multiplies KL / N (1: the true ELBO).
        warmup_epochs: Linear KL warm-up from 0 over this many epochs.
        clip: Gradient norm clipping (None or 0: off).
        seed: Seed of the data order and the weight noise.
        val_samples: Weight samples for the validation metrics.
        noise: The weight noise of each training step, "fresh" (default) or
            "shifted" (cheaper; see `BayesianModule`'s `noise`).
        class_dim: Classification: the dimension of the classes in the model's
            output (0 is the batch; default: a resumed fit's, else the last, -1).
        x_key: Input tensor name in data files, or names of several inputs (`NAME`
            or `NAME=TENSOR`); each goes to forward's parameter of its name, or
            fills its first free parameters in order.
        y_key: Target tensor name in data files.
        target: CSV target column (name or index; default: the last).
        model_args: Constant arguments of the model's forward, by name (a mapping,
            or `NAME=VALUE` strings with YAML scalar values), e.g. `{"sr": 16000}`.
        output: The fitted checkpoint [default: `<checkpoint>.fit.safetensors`].
        resume: Continue a previous fit (its noise scale, history and task).
        device: Where to train (default "cpu").
        arch: For a state dict: confirms the architecture the checkpoint names.
        arch_kwargs: Confirms its recorded keyword arguments too (a JSON object or a
            mapping; needed when it has any).
        trust_pickle: Load a pickled `nn.Module` file (this runs its code).
        force: Overwrite `output` if it exists.
        on_epoch: Called with each epoch's record (on rank 0).

    Raises:
        UsageError: For a missing or conflicting task, an invalid setting, or inputs
            and model arguments that do not fit the model's forward.
        InputError: If the model is not the checkpoint's, or the data do not fit it or
            overflow it.
        UnsafeInputError: If the checkpoint names an architecture that `arch` and
            `arch_kwargs` do not confirm.
        OutputExistsError: If `output` exists and `force` is false.
        DivergedError: If the loss, its gradient or the parameters become infinite or
            NaN (nothing is written).
    """
    if not 0.0 <= val_split < 1.0:
        raise InvalidArgumentError(f"val_split must be in [0, 1), got {val_split!r}")
    device = process_device(resolve_device(device))
    destination = Path(output) if output is not None else derived_name(path_of(checkpoint), "fit")
    paths = file_paths(checkpoint, model, data, val)
    outputs = AtomicOutputs([destination], force=force, inputs=paths)
    ckpt = as_checkpoint(checkpoint)
    chosen = _task(task, ckpt, resume)
    settings = FitSettings(
        task=chosen,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        mc_samples=mc_samples,
        kl_weight=kl_weight,
        warmup_epochs=warmup_epochs,
        clip=clip or None,
        seed=seed,
        val_samples=val_samples,
        noise=noise,
        class_dim=_class_dim(class_dim, ckpt, resume),
    )
    constants = model_arguments(model_args)
    keys = {"x_key": x_key, "y_key": y_key, "target": target}
    train_data = as_dataset(data, **keys)
    validation = as_dataset(val, **keys) if val is not None else None
    if validation is None and val_split > 0:
        train_data, validation = _split(train_data, val_split, seed)
    if validation is not None and validation.x.names != train_data.x.names:
        raise InputError(
            f"the validation inputs ({', '.join(validation.x.names)}) are not the training "
            f"inputs ({', '.join(train_data.x.names)})",
            hint="Store the same input tensors in both files.",
        )
    with opened_model(model, trust_pickle=trust_pickle, key=ckpt.source.get("key")) as loaded:
        confirm = {"arch": arch, "arch_kwargs": arch_kwargs, "model_args": constants}
        runner = open_runner(loaded, ckpt, device=device, **confirm)
        source = {"name": loaded.path.name, "sha256": loaded.sha256}
        what = f"{loaded.path.name} ({loaded.format.value})"
    likelihood = make_likelihood(chosen, ckpt, resume, settings.class_dim)
    for part in (train_data, validation):
        if part is not None:
            _check_fits(runner, likelihood, part)
    val_estimator = None
    if validation is not None:
        choice = runner.estimator(validation.x[: settings.batch_size])  # as evaluate's
        val_estimator = {"estimator": choice.estimator.value, "reason": choice.reason}
        logger.info("Validation predictions: %s", choice)
    _check_noise(runner, settings.noise)
    previous = (ckpt.fit or {}).get("history", []) if resume else []
    logger.info(
        "Fitting %d Bayesian parameters of %s on %d examples, %s",
        len(ckpt.parameters),
        what,
        len(train_data),
        chosen.value,
    )
    history = train(
        runner,
        likelihood,
        train_data,
        settings,
        val=validation,
        start_epoch=len(previous),
        init_noise=not resume,
        on_epoch=on_epoch,
    )
    result = FitResult(
        output=destination,
        task=chosen,
        settings=settings,
        n_train=len(train_data),
        n_val=0 if validation is None else len(validation),
        data=_name(data, train_data),
        model=source,
        history=previous + history,
        inputs=train_data.x.names,
        model_args=constants,
        call=runner.call.describe(train_data.x.names),
        val_estimator=val_estimator,
    )
    if process_rank() == 0:
        with outputs:
            temp = outputs.temp(destination)
            save_fitted(destination, temp, ckpt, runner, likelihood, result.info())
    return result


def _check_noise(runner: Runner, noise: NoiseMode) -> None:
    """Warns when shifted noise was asked for where only fresh noise can serve."""
    eager = [k for k in runner.bnn.training_kernels() if k != "compiled"]
    if noise is NoiseMode.SHIFTED and eager:
        logger.warning(
            "shifted noise serves the compiled training kernels only; these steps draw "
            "fresh noise instead: %s (BNNIFY_COMPILE=1 compiles a store of any size)",
            "; ".join(eager),
        )


def _check_fits(runner: Runner, likelihood: Likelihood, data: Dataset) -> None:
    """The model runs on the inputs, and its outputs fit the targets' likelihood."""
    output = check_input(runner, data.x)
    like_targets = output[:1].expand(len(data.y), *output.shape[1:])
    likelihood.check(like_targets, data.y.to(output.device))


def _name(data: DataLike, dataset: Dataset) -> str:
    return Path(data).name if isinstance(data, (str, Path)) else dataset.source


def _task(task: Task | str | None, ckpt: Checkpoint, resume: bool) -> Task:
    fitted = (ckpt.fit or {}).get("task")
    if resume and fitted is None:
        raise UsageError(
            f"{ckpt.path.name} was never fitted: there is nothing to resume",
            hint="Drop --resume to start fitting it.",
        )
    if task is None:
        if resume:
            return Task.parse(fitted)
        raise UsageError("choose the task with --task regression or --task classification")
    task = Task.parse(task)
    if resume and task.value != fitted:
        raise UsageError(f"--task {task.value} differs from the resumed fit's task {fitted!r}")
    return task


def _class_dim(class_dim: int | None, ckpt: Checkpoint, resume: bool) -> int:
    if class_dim is not None:
        return class_dim
    settings = ((ckpt.fit or {}).get("settings") or {}) if resume else {}
    return settings.get("class_dim", -1)


def _split(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    n = len(data)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = n - max(1, round(fraction * n))
    if cut < 1:
        raise UsageError(
            f"--val-split {fraction} leaves no training data from {n} example(s)",
            hint="Use a smaller fraction or a separate --val file.",
        )
    train, val = order[:cut], order[cut:]
    return (
        Dataset(data.x[train], data.y[train], data.source),
        Dataset(data.x[val], data.y[val], data.source + " (validation split)"),
    )
