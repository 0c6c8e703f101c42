"""`bnnify fit`: fit a converted checkpoint's posterior to data (variational inference)."""

from __future__ import annotations

import os
from typing import Any

from bnnify.cli import options as opt
from bnnify.cli.fit_render import log_epoch, render
from bnnify.cli.output import Output, command
from bnnify.cli.reporting import reporting

__all__ = ["fit"]


@command
def fit(
    checkpoint: opt.CheckpointArg,
    model: opt.ModelOpt,
    data: opt.DataOpt,
    task: opt.FitTaskOpt = None,
    val: opt.ValOpt = None,
    val_split: opt.ValSplitOpt = None,
    epochs: opt.EpochsOpt = 1000,
    patience: opt.PatienceOpt = 50,
    lr: opt.LrOpt = 1e-2,
    batch_size: opt.BatchSizeOpt = 32,
    mc_samples: opt.FitSamplesOpt = 1,
    kl_weight: opt.KlWeightOpt = 0.1,
    warmup_epochs: opt.WarmupOpt = 0,
    clip: opt.ClipOpt = 10.0,
    seed: opt.SeedOpt = 0,
    val_samples: opt.ValSamplesOpt = 16,
    noise: opt.NoiseOpt = "fresh",
    search: opt.SearchOpt = False,
    input_key: opt.InputKeyOpt = None,
    y_key: opt.YKeyOpt = "y",
    target: opt.TargetOpt = None,
    model_arg: opt.ModelArgOpt = None,
    class_dim: opt.ClassDimOpt = None,
    out: opt.FitOutOpt = None,
    resume: opt.ResumeOpt = False,
    device: opt.DeviceOpt = None,
    arch: opt.ArchOpt = None,
    arch_kwargs: opt.ArchKwargsOpt = None,
    trust_pickle: opt.TrustPickleOpt = False,
    force: opt.ForceOpt = False,
    json: opt.JsonOpt = False,
    quiet: opt.QuietOpt = False,
    verbose: opt.FitVerboseOpt = False,
) -> None:
    """Fit the posterior to data by maximising the ELBO (expected NLL + KL / N).

    With validation data (--val, --val-split; 10% of the data by default) the epoch of
    best validation log-likelihood is kept. --json prints JSON Lines: one object per
    epoch (schema bnnify.fit.epoch/1), then the summary (schema bnnify.fit/1).

    Runs under `torchrun --nproc_per_node=N -m bnnify fit ...` with
    DistributedDataParallel (gloo on CPU, nccl on GPU); rank 0 writes the output.
    """
    rank = int(os.environ.get("RANK", "0"))  # only rank 0 speaks, its JSON too
    sink = Output(command="fit", json_mode=json and not rank, quiet=quiet or rank, verbose=verbose)
    import bnnify
    from bnnify.usecases.fit import EPOCH_SCHEMA, POINT_SCHEMA
    from bnnify.usecases.search import grid

    total = epochs * (len(grid()) if search else 1)

    settings = dict(task=task, val=val, val_split=val_split, epochs=epochs, lr=lr, noise=noise)
    settings |= dict(batch_size=batch_size, mc_samples=mc_samples, kl_weight=kl_weight)
    settings |= dict(warmup_epochs=warmup_epochs, clip=clip, seed=seed, val_samples=val_samples)
    settings |= dict(patience=patience, search=search)
    settings |= dict(class_dim=class_dim, model_args=model_arg, force=force, resume=resume)
    files = dict(x_key=input_key or "x", y_key=y_key, target=target, output=out, device=device)
    files |= dict(arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
    with reporting(sink, "Fitting") as progress:

        def on_epoch(record: dict[str, Any]) -> None:
            progress(1, total)
            sink.json_line({"schema": EPOCH_SCHEMA, **record})
            log_epoch(sink, record, epochs)

        def on_point(point: dict[str, Any]) -> None:
            sink.json_line({"schema": POINT_SCHEMA, **point})

        result = bnnify.fit(
            checkpoint, model, data, on_epoch=on_epoch, on_point=on_point, **settings, **files
        )
    sink.json_line(result.to_json())
    render(sink, result.to_json(), result.output)
