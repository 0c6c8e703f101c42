"""`bnnify fit`: fit a converted checkpoint's posterior to data (variational inference)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bnnify.cli import options as opt
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
    val_split: opt.ValSplitOpt = 0.0,
    epochs: opt.EpochsOpt = 50,
    lr: opt.LrOpt = 1e-3,
    batch_size: opt.BatchSizeOpt = 128,
    mc_samples: opt.FitSamplesOpt = 1,
    kl_weight: opt.KlWeightOpt = 1.0,
    warmup_epochs: opt.WarmupOpt = 0,
    clip: opt.ClipOpt = 10.0,
    seed: opt.SeedOpt = 0,
    val_samples: opt.ValSamplesOpt = 16,
    noise: opt.NoiseOpt = "fresh",
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

    Runs under `torchrun --nproc_per_node=N -m bnnify fit ...` with
    DistributedDataParallel (gloo on CPU, nccl on GPU); rank 0 writes the output.
    """
    rank = int(os.environ.get("RANK", "0"))  # only rank 0 speaks, its JSON too
    sink = Output(command="fit", json_mode=json and not rank, quiet=quiet or rank, verbose=verbose)
    import bnnify

    settings = dict(task=task, val=val, val_split=val_split, epochs=epochs, lr=lr, noise=noise)
    settings |= dict(batch_size=batch_size, mc_samples=mc_samples, kl_weight=kl_weight)
    settings |= dict(warmup_epochs=warmup_epochs, clip=clip, seed=seed, val_samples=val_samples)
    settings |= dict(class_dim=class_dim, model_args=model_arg, force=force, resume=resume)
    files = dict(x_key=input_key or "x", y_key=y_key, target=target, output=out, device=device)
    files |= dict(arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
    with reporting(sink, "Fitting") as progress:

        def on_epoch(record: dict[str, Any]) -> None:
            progress(1, epochs)
            _log_epoch(sink, record, epochs)

        result = bnnify.fit(checkpoint, model, data, on_epoch=on_epoch, **settings, **files)
    _render(sink, result.to_json(), result.output)


def _log_epoch(out: Output, record: dict, epochs: int) -> None:
    val = record.get("val") or {}
    parts = [f"epoch {record['epoch']}", f"ELBO/N {record['elbo']:.4g}"]
    parts += [f"NLL {record['nll']:.4g}", f"KL {record['kl']:.4g}"]
    parts += [f"val {k} {v:.4g}" for k, v in val.items()]
    every = max(1, epochs // 10)
    if out.verbose or record["epoch"] % every == 0:
        out.log("  ".join(parts))


def _render(out: Output, info: dict, destination: Path) -> None:
    out.json(info)
    final = info["final"]
    out.line(
        f"Fitted {info['n_train']} examples for {len(info['history'])} epochs: "
        f"ELBO/N {final['elbo']:.5g}, NLL {final['nll']:.5g}, KL {final['kl']:.5g}"
        + (f", noise {final['noise']:.4g}" if "noise" in final else "")
    )
    for key, value in (final.get("val") or {}).items():
        out.line(f"  validation {key}: {value:.5g}")
    if info.get("val_estimator"):
        out.line("  validation estimator: {estimator} ({reason})".format(**info["val_estimator"]))
    out.line(f"  wrote {destination}")
