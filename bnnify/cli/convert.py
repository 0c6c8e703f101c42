"""`bnnify convert`: a model file in, a variational checkpoint and a KL report out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from bnnify.cli.options import (
    ArchKwargsOpt,
    ArchOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    McSamplesOpt,
    PriorArgOpt,
    PriorOpt,
    QuietOpt,
    TrustPickleOpt,
    VerboseOpt,
)
from bnnify.cli.output import Output, command, human_bytes, parse_size

__all__ = ["convert"]


@command
def convert(
    model: Annotated[
        Path,
        typer.Argument(
            help="Model file (TorchScript, torch.export, state dict, "
            "safetensors) or sharded checkpoint folder/index."
        ),
    ],
    spec: Annotated[Path | None, typer.Option("--spec", "-c", help="YAML conversion spec.")] = None,
    posterior: Annotated[
        str | None,
        typer.Option(
            help="Posterior name; default pretrained_gaussian (mu = the trained "
            "weights, sigma = 0.1 |w|)."
        ),
    ] = None,
    posterior_arg: Annotated[
        list[str] | None, typer.Option("--posterior-arg", help="Posterior argument key=value.")
    ] = None,
    prior: PriorOpt = None,
    prior_arg: PriorArgOpt = None,
    device: DeviceOpt = None,
    dtype: Annotated[
        str | None, typer.Option(help="float32, float64, float16 or bfloat16 (default: keep).")
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option(help="Glob of parameter names to make Bayesian.")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Glob of parameter names to keep deterministic.")
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Random seed (default 0).")] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Checkpoint path [default: <stem>.bnn.safetensors]."),
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="KL report path [default: <stem>.kl.safetensors].")
    ] = None,
    mc_samples: McSamplesOpt = None,
    shard_size: Annotated[
        str | None,
        typer.Option(
            help="Write a sharded checkpoint with shards up to this size (e.g. 2GB); "
            "default for sharded inputs: their largest shard."
        ),
    ] = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    force: ForceOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Convert a trained model into a Bayesian one (a variational checkpoint + KL report).

    The default posterior keeps the trained weights as posterior means
    (pretrained_gaussian with sigma = 0.1 |w|); the default prior is N(0, 1).
    """
    out = Output(json_mode=json, quiet=quiet, verbose=verbose)
    from bnnify.formats.atomic import check_outputs
    from bnnify.formats.model_files import ModelFormat, load_model
    from bnnify.formats.spec import resolve_spec
    from bnnify.usecases.convert import convert as run_conversion
    from bnnify.usecases.convert import output_paths

    resolved = resolve_spec(
        spec,
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
    checkpoint, report_path = output_paths(model, output, report)
    read = [model, *([spec] if spec else [])]
    # Before loading: existence is checked by the conversion, once its outputs are known.
    check_outputs([checkpoint, report_path], force=True, inputs=read)
    shard_bytes = parse_size(shard_size) if shard_size else None
    with load_model(model, device="cpu", trust_pickle=trust_pickle) as loaded:
        out.log(f"Loaded {model} ({loaded.format.value}, {len(loaded.names())} tensors)")
        if shard_bytes is None and loaded.format is ModelFormat.SHARDED:
            shard_bytes = _largest_shard(loaded)
        total = sum(loaded.meta(n).numel for n in loaded.names())
        with out.progress(total, "Converting") as advance:
            result = run_conversion(
                loaded,
                resolved,
                checkpoint=checkpoint,
                report=report_path,
                force=force,
                mc_samples=mc_samples,
                shard_bytes=shard_bytes,
                progress=lambda name, n: advance(n),
                arch=arch,
                arch_kwargs=arch_kwargs,
                inputs=read,
            )
    _render(out, result, resolved)


def _largest_shard(loaded: Any) -> int:
    from bnnify.formats.detect import resolve_model_path
    from bnnify.formats.sharded import read_index

    return max(f.stat().st_size for f in read_index(resolve_model_path(loaded.path)).files)


def _render(out: Output, result: Any, spec: Any) -> None:
    params = [
        {
            "name": p.name,
            "shape": p.shape,
            "elements": p.numel,
            "dtype": p.dtype,
            "sigma_init": p.sigma_mean,
            "kl": p.kl,
        }
        for p in result.parameters
    ]
    out.json(
        {
            "source": result.source,
            "spec": spec.to_json(),
            "reparametrized": len(result.parameters),
            "deterministic": len(result.deterministic),
            "deterministic_names": result.deterministic,
            "variational_elements": result.elements,
            "kl": {
                "sum": result.kl_sum,
                "mean": result.kl_mean,
                "method": result.method,
                "samples": result.samples,
            },
            "outputs": [str(p) for p in result.outputs],
            "parameters": params,
        }
    )
    if out.verbose:
        table = Table(title="Reparametrized parameters", title_justify="left")
        for column in (
            "name",
            "shape",
            "elements",
            "dtype",
            "posterior",
            "prior",
            "sigma init",
            "KL",
        ):
            table.add_column(
                column,
                overflow="fold",
                justify="right" if column in ("elements", "sigma init", "KL") else "left",
            )
        for p in result.parameters:
            table.add_row(
                Text(p.name),
                str(tuple(p.shape)),
                f"{p.numel:,}",
                p.dtype,
                spec.posterior[0],
                spec.prior[0],
                f"{p.sigma_mean:.3g}",
                f"{p.kl:.4g}",
            )
        out.table(table)
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
        size = human_bytes(path.stat().st_size) if path.exists() else "?"
        out.line(f"  wrote {path} ({size})")
