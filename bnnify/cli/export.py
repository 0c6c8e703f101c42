"""`bnnify export`: a plain PyTorch model of a posterior (its means, a sample, an ensemble)."""

from __future__ import annotations

from typing import Any

from bnnify.cli import options as opt
from bnnify.cli.output import Output, command
from bnnify.cli.reporting import reporting

__all__ = ["export", "render"]


@command
def export(
    checkpoint: opt.AnyCheckpointArg,
    model: opt.ModelOpt,
    format: opt.ExportFormatOpt = None,
    weights: opt.WeightsOpt = "mean",
    seed: opt.ExportSeedOpt = 0,
    input: opt.ExportInputOpt = None,
    x_key: opt.XKeyOpt = "x",
    task: opt.DefaultTaskOpt = None,
    aleatoric: opt.AleatoricOpt = False,
    output: opt.ExportOutOpt = None,
    arch: opt.ArchOpt = None,
    arch_kwargs: opt.ArchKwargsOpt = None,
    trust_pickle: opt.TrustPickleOpt = False,
    force: opt.ForceOpt = False,
    json: opt.JsonOpt = False,
    quiet: opt.QuietOpt = False,
) -> None:
    """Write a plain PyTorch model that needs nothing from bnnify.

    The posterior means, one seeded sample, or an ensemble of K samples returning
    their mean and standard deviation.
    """
    sink = Output(command="export", json_mode=json, quiet=quiet)
    import bnnify

    options = dict(format=format, weights=weights, seed=seed, inputs=input, x_key=x_key)
    options |= dict(task=task, aleatoric=aleatoric, output=output, arch=arch)
    options |= dict(arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, force=force)
    with reporting(sink, "Exporting"):
        result = bnnify.export(checkpoint, model, **options)
    sink.json(result.to_json())
    render(sink, result)


def render(out: Output, result: Any) -> None:
    """The human summary of an `ExportResult`."""
    what = {"mean": "posterior means", "sample": f"one sample (seed {result.seed})"}.get(
        result.weights, f"ensemble of {result.samples} samples (seed {result.seed})"
    )
    out.line(f"Exported {what} of {result.checkpoint} as {result.format.value}")
    if result.weights == "ensemble":
        out.line(
            f"  returns (mean, std) of the {result.reduce}: {result.spread} spread, "
            f"{result.batching} over the weight sets"
        )
    if result.dynamic_batch is not None:
        out.line(f"  batch dimension: {'dynamic' if result.dynamic_batch else 'fixed'}")
    check = result.check
    if check is not None and check["kind"] == "outputs":
        out.line(
            f"  checked on {check['examples']} examples: max abs difference "
            f"{check['max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g})"
        )
    elif check is not None:
        out.line("  checked: the tensors read back as written")
    out.line(f"  wrote {result.output} ({result.bytes:,} bytes)")
