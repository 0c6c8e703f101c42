"""`bnnify fit`: fit a converted checkpoint's posterior to data (variational inference)."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from bnnify.cli.options import (
    ArchKwargsOpt,
    ArchOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
    TrustPickleOpt,
    VerboseOpt,
)
from bnnify.cli.output import Output, command

__all__ = ["Noise", "Task", "fit"]


class Task(str, Enum):
    regression = "regression"
    classification = "classification"


class Noise(str, Enum):
    """The words of `bnnify.bnn.noise.NoiseMode` (not imported: it would import torch)."""

    fresh = "fresh"
    shifted = "shifted"


@command
def fit(
    checkpoint: Annotated[Path, typer.Argument(help="Variational checkpoint to fit.")],
    model: ModelOpt,
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Training data: safetensors (x, y), .npz, CSV.")
    ],
    task: Annotated[
        Task | None,
        typer.Option(
            help="regression (Gaussian likelihood, learned noise) or classification "
            "(logits). Default: the task of a resumed fit."
        ),
    ] = None,
    val: Annotated[Path | None, typer.Option(help="Validation data file.")] = None,
    val_split: Annotated[
        float, typer.Option(min=0.0, max=0.9, help="Fraction of the data held out instead.")
    ] = 0.0,
    epochs: Annotated[int, typer.Option(min=1)] = 50,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    mc_samples: Annotated[
        int, typer.Option(min=1, help="Weight samples per step for the expected NLL.")
    ] = 1,
    kl_weight: Annotated[
        float, typer.Option(min=0.0, help="Multiplies KL / N (1: the true ELBO).")
    ] = 1.0,
    warmup_epochs: Annotated[
        int, typer.Option(min=0, help="Linear KL warm-up from 0 over this many epochs.")
    ] = 0,
    clip: Annotated[float, typer.Option(min=0.0, help="Gradient norm clipping (0: off).")] = 10.0,
    seed: Annotated[int, typer.Option(min=0, max=2**31 - 1)] = 0,
    val_samples: Annotated[
        int, typer.Option(min=1, help="Weight samples for validation metrics.")
    ] = 16,
    noise: Annotated[
        Noise,
        typer.Option(
            help="Weight noise of each training step: fresh normals, or one reused buffer "
            "under a random shift and signs (cheaper; see README)."
        ),
    ] = Noise.fresh,
    x_key: Annotated[str, typer.Option(help="Input tensor name in the data file.")] = "x",
    y_key: Annotated[str, typer.Option(help="Target tensor name in the data file.")] = "y",
    target: Annotated[
        str | None, typer.Option(help="CSV target column (name or index; default: last).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Fitted checkpoint [default: <checkpoint>.fit.safetensors]."
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue a previous fit (its noise scale, history, task).")
    ] = False,
    device: DeviceOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    force: ForceOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Fit the posterior to data by maximising the ELBO (expected NLL + KL / N).

    Runs under `torchrun --nproc_per_node=N -m bnnify fit ...` with
    DistributedDataParallel (gloo on CPU, nccl on GPU); rank 0 writes the output.
    """
    rank = int(os.environ.get("RANK", "0"))
    out_sink = Output(json_mode=json, quiet=quiet or rank != 0, verbose=verbose)
    from bnnify.formats.atomic import AtomicOutputs
    from bnnify.formats.checkpoint import Checkpoint
    from bnnify.formats.data import load_dataset
    from bnnify.formats.model_files import load_model
    from bnnify.formats.spec import resolve_device
    from bnnify.usecases.fit import (
        FitSettings,
        make_likelihood,
        process_device,
        save_fitted,
        settings_json,
    )
    from bnnify.usecases.fit import fit as run_fit
    from bnnify.usecases.runner import open_runner

    device = process_device(resolve_device(device))
    destination = out or checkpoint.with_name(_fit_name(checkpoint))
    read = [checkpoint, model, data, *([val] if val else [])]
    outputs = AtomicOutputs([destination], force=force, inputs=read)
    with Checkpoint(checkpoint) as ckpt:
        chosen = _task(task, ckpt, resume)
        train = load_dataset(data, x_key=x_key, y_key=y_key, target=target)
        validation = load_dataset(val, x_key=x_key, y_key=y_key, target=target) if val else None
        if validation is None and val_split > 0:
            train, validation = _split(train, val_split, seed)
        loaded = load_model(model, device="cpu", trust_pickle=trust_pickle)
        runner = open_runner(loaded, ckpt, device=device, arch=arch, arch_kwargs=arch_kwargs)
        likelihood = make_likelihood(chosen, ckpt, resume)
        _check_shapes(runner, likelihood, train)
        if validation is not None:
            _check_shapes(runner, likelihood, validation)
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
            noise=noise.value,
        )
        previous = (ckpt.fit or {}).get("history", []) if resume else []
        out_sink.log(
            f"Fitting {len(ckpt.parameters)} Bayesian parameters of {model.name} "
            f"({loaded.format.value}) on {len(train)} examples, {chosen}"
        )
        with out_sink.progress(epochs, "Fitting") as advance:
            history = run_fit(
                runner,
                likelihood,
                train,
                settings,
                val=validation,
                start_epoch=len(previous),
                init_noise=not resume,
                on_epoch=lambda record: _on_epoch(out_sink, record, epochs, advance),
            )
        info = {
            "task": chosen,
            "settings": settings_json(settings),
            "n_train": len(train),
            "n_val": 0 if validation is None else len(validation),
            "data": data.name,
            "model": {"name": loaded.path.name, "sha256": loaded.sha256},
            "history": previous + history,
            "final": history[-1],
        }
        if rank == 0:
            with outputs:
                save_fitted(destination, outputs.temp(destination), ckpt, runner, likelihood, info)
    _render(out_sink, info, destination)


def _fit_name(checkpoint: Path) -> str:
    name = checkpoint.name
    for suffix in (".safetensors.index.json", ".safetensors"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return f"{name}.fit.safetensors"


def _task(task: Task | None, ckpt: Any, resume: bool) -> str:
    from bnnify.errors import UsageError

    fitted = (ckpt.fit or {}).get("task")
    if resume and fitted is None:
        raise UsageError(
            f"{ckpt.path.name} was never fitted: there is nothing to resume",
            hint="Drop --resume to start fitting it.",
        )
    if task is None:
        if resume:
            return fitted
        raise UsageError("choose the task with --task regression or --task classification")
    if resume and task.value != fitted:
        raise UsageError(f"--task {task.value} differs from the resumed fit's task {fitted!r}")
    return task.value


def _split(data: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    import torch

    from bnnify.formats.data import Dataset

    n = len(data)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = n - max(1, round(fraction * n))
    if cut < 1:
        from bnnify.errors import UsageError

        raise UsageError(
            f"--val-split {fraction} leaves no training data from {n} example(s)",
            hint="Use a smaller fraction or a separate --val file.",
        )
    train, val = order[:cut], order[cut:]
    return (
        Dataset(data.x[train], data.y[train], data.source),
        Dataset(data.x[val], data.y[val], data.source + " (validation split)"),
    )


def _check_shapes(runner: Any, likelihood: Any, data: Any) -> None:
    from bnnify.usecases.runner import check_input

    output = check_input(runner, data.x)
    likelihood.check(output[:1].expand(len(data.y), *output.shape[1:]), data.y.to(output.device))


def _on_epoch(out: Output, record: dict, epochs: int, advance: Any) -> None:
    advance(1)
    val = record.get("val") or {}
    parts = [
        f"epoch {record['epoch']}",
        f"ELBO/N {record['elbo']:.4g}",
        f"NLL {record['nll']:.4g}",
        f"KL {record['kl']:.4g}",
    ]
    parts += [f"val {k} {v:.4g}" for k, v in val.items()]
    every = max(1, epochs // 10)
    if out.verbose or record["epoch"] % every == 0:
        out.log("  ".join(parts))


def _render(out: Output, info: dict, destination: Path) -> None:
    out.json({"output": str(destination), **info})
    final = info["final"]
    out.line(
        f"Fitted {info['n_train']} examples for {len(info['history'])} epochs: "
        f"ELBO/N {final['elbo']:.5g}, NLL {final['nll']:.5g}, KL {final['kl']:.5g}"
        + (f", noise {final['noise']:.4g}" if "noise" in final else "")
    )
    for key, value in (final.get("val") or {}).items():
        out.line(f"  validation {key}: {value:.5g}")
    out.line(f"  wrote {destination}")
