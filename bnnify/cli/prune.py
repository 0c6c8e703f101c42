"""`bnnify prune`: zero the weights of lowest signal-to-noise ratio |mu|/sigma."""

from __future__ import annotations

from typing import Any

from bnnify.cli import options as opt
from bnnify.cli.export import render as render_export
from bnnify.cli.output import Output, command
from bnnify.cli.reporting import reporting
from bnnify.enums import PruneScope

__all__ = ["prune"]


@command
def prune(
    checkpoint: opt.AnyCheckpointArg,
    model: opt.OptionalModelOpt = None,
    keep: opt.KeepOpt = None,
    snr_threshold: opt.SnrThresholdOpt = None,
    scope: opt.ScopeOpt = PruneScope.GLOBAL,
    output: opt.PruneOutOpt = None,
    data: opt.PruneDataOpt = None,
    targets: opt.TargetsOpt = None,
    task: opt.DefaultTaskOpt = None,
    samples: opt.SamplesOpt = 32,
    batch_size: opt.BatchSizeOpt = 256,
    x_key: opt.XKeyOpt = "x",
    y_key: opt.YKeyOpt = "y",
    seed: opt.ExportSeedOpt = 0,
    export: opt.ExportFlagOpt = False,
    format: opt.ExportFormatOpt = None,
    weights: opt.WeightsOpt = "mean",
    arch: opt.ArchOpt = None,
    arch_kwargs: opt.ArchKwargsOpt = None,
    trust_pickle: opt.TrustPickleOpt = False,
    force: opt.ForceOpt = False,
    json: opt.JsonOpt = False,
    quiet: opt.QuietOpt = False,
) -> None:
    """Set to zero the weights of lowest signal-to-noise ratio |mu|/sigma.

    By --keep FRACTION or --snr-threshold T: writes a pruned checkpoint, or with
    --export a plain model; metrics before and after with --data.
    """
    sink = Output(command="prune", json_mode=json, quiet=quiet)
    import bnnify

    options = dict(keep=keep, snr_threshold=snr_threshold, scope=scope, output=output)
    options |= dict(data=data, targets=targets, task=task, samples=samples, seed=seed)
    options |= dict(batch_size=batch_size, x_key=x_key, y_key=y_key, export=export)
    options |= dict(format=format, weights=weights, arch=arch, arch_kwargs=arch_kwargs)
    options |= dict(trust_pickle=trust_pickle, force=force)
    with reporting(sink, "Pruning"):
        result = bnnify.prune(checkpoint, model, **options)
    sink.json(result.to_json())
    _render(sink, result)


def _render(out: Output, result: Any) -> None:
    rule = (
        f"keep {result.keep:g}"
        if result.keep is not None
        else f"|mu|/sigma < {result.snr_threshold:g}"
    )
    out.line(
        f"Pruned {result.removed:,} of {result.elements:,} Bayesian weights "
        f"({100 * result.fraction_removed:.1f}%, {rule}, {result.scope.value})"
    )
    if result.snr_cut is not None:
        out.line(f"  highest |mu|/sigma pruned: {result.snr_cut:.4g}")
    for stage in ("before", "after"):
        for model, metrics in (result.metrics or {}).get(stage, {}).items():
            values = ", ".join(
                f"{k} {'n/a' if v is None else f'{v:.5g}'}" for k, v in metrics.items()
            )
            out.line(f"  {stage:<6} {model.replace('_', ' ')}: {values}")
    if result.export is not None:
        render_export(out, result.export)
    else:
        out.line(f"  wrote {result.output}")
