"""`bnnify convert`: a model file in, a variational checkpoint and a KL report out."""

from __future__ import annotations

from typing import Any

from rich.text import Text

from bnnify.cli import options as opt
from bnnify.cli.output import Output, command, human_bytes
from bnnify.cli.reporting import reporting
from bnnify.cli.tables import table

__all__ = ["convert"]

COLUMNS = ("name", "shape", "elements", "dtype", "posterior", "prior", "sigma init", "KL")


@command
def convert(
    model: opt.ModelArg,
    spec: opt.SpecOpt = None,
    posterior: opt.PosteriorOpt = None,
    posterior_arg: opt.PosteriorArgOpt = None,
    prior: opt.PriorOpt = None,
    prior_arg: opt.PriorArgOpt = None,
    device: opt.DeviceOpt = None,
    dtype: opt.DtypeOpt = None,
    include: opt.IncludeOpt = None,
    exclude: opt.ExcludeOpt = None,
    seed: opt.ConvertSeedOpt = None,
    output: opt.CheckpointOutOpt = None,
    report: opt.ReportOpt = None,
    mc_samples: opt.McSamplesOpt = None,
    shard_size: opt.ShardSizeOpt = None,
    arch: opt.ArchOpt = None,
    arch_kwargs: opt.ArchKwargsOpt = None,
    trust_pickle: opt.TrustPickleOpt = False,
    force: opt.ForceOpt = False,
    json: opt.JsonOpt = False,
    quiet: opt.QuietOpt = False,
    verbose: opt.VerboseOpt = False,
) -> None:
    """Convert a trained model into a Bayesian one (a variational checkpoint + KL report).

    The default posterior keeps the trained weights as posterior means
    (pretrained_gaussian with sigma = 0.1 |w|); the default prior is N(0, 1).
    """
    out = Output(json_mode=json, quiet=quiet, verbose=verbose)
    import bnnify

    with reporting(out, "Converting") as progress:
        result = bnnify.convert(
            model,
            spec,
            output=output,
            report=report,
            force=force,
            mc_samples=mc_samples,
            shard_size=shard_size,
            trust_pickle=trust_pickle,
            progress=progress,
            arch=arch,
            arch_kwargs=arch_kwargs,
            posterior=posterior,
            posterior_args=posterior_arg or (),
            prior=prior,
            prior_args=prior_arg or (),
            device=device,
            dtype=dtype,
            include=include,
            exclude=exclude,
            seed=seed,
        )
    _render(out, result)


def _render(out: Output, result: Any) -> None:
    out.json(result.to_json())
    if out.verbose:
        posterior, prior = result.spec.posterior[0], result.spec.prior[0]
        rows = []
        for p in result.parameters:
            size, sigma, kl = f"{p.numel:,}", f"{p.sigma_mean:.3g}", f"{p.kl:.4g}"
            rows.append(
                (Text(p.name), str(tuple(p.shape)), size, p.dtype, posterior, prior, sigma, kl)
            )
        right = ("elements", "sigma init", "KL")
        out.table(table("Reparametrized parameters", COLUMNS, rows, right=right))
    method = "analytic" if result.samples is None else f"Monte Carlo, {result.samples} samples"
    out.line(
        f"Converted {result.source['name']} ({result.source['format']}): "
        f"{len(result.parameters)} parameters reparametrized "
        f"({result.elements:,} elements), {len(result.deterministic)} kept deterministic"
    )
    out.line(
        f"KL divergence: {result.kl_sum:.6g} (mean {result.kl_mean:.6g} per element, {method})"
    )
    for path in result.outputs:
        out.line(f"  wrote {path} ({human_bytes(path.stat().st_size) if path.exists() else '?'})")
