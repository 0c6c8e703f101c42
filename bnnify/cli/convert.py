"""`bnnify convert`: a model file in, a variational checkpoint and a KL report out."""

from __future__ import annotations

from typing import Any

from bnnify.cli import options as opt
from bnnify.cli.output import Output, command
from bnnify.cli.reporting import reporting
from bnnify.cli.tables import conversion_lines, conversion_pair, conversion_table

__all__ = ["convert"]


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
    only: opt.OnlyOpt = None,
    skip: opt.SkipOpt = None,
    key: opt.KeyOpt = None,
    seed: opt.ConvertSeedOpt = None,
    output: opt.CheckpointOutOpt = None,
    report: opt.ReportOpt = None,
    mc_samples: opt.McSamplesOpt = None,
    shard_size: opt.ShardSizeOpt = None,
    arch: opt.ArchOpt = None,
    arch_kwargs: opt.ArchKwargsOpt = None,
    trust_pickle: opt.TrustPickleOpt = False,
    dry_run: opt.DryRunOpt = False,
    force: opt.ForceOpt = False,
    json: opt.JsonOpt = False,
    quiet: opt.QuietOpt = False,
    verbose: opt.VerboseOpt = False,
    top: opt.TopOpt = 0,
    filter: opt.FilterOpt = None,
) -> None:
    """Convert a trained model into a Bayesian one (a variational checkpoint + KL report).

    The default posterior keeps the trained weights as posterior means
    (pretrained_gaussian with sigma = 0.1 |w|); the default prior is N(0, 1).
    """
    out = Output(command="convert", json_mode=json, quiet=quiet, verbose=verbose)
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
            key=key,
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
            only=only,
            skip=skip,
            seed=seed,
            dry_run=dry_run,
        )
    _render(out, result, top, filter)


def _render(out: Output, result: Any, top: int, pattern: str | None) -> None:
    out.json(result.to_json())
    if out.verbose or result.dry_run:
        out.line(conversion_pair(result))
        out.table(conversion_table(result, top=top, pattern=pattern))
    for line in conversion_lines(result):
        out.line(line)
