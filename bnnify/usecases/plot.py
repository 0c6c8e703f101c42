"""`plot`: the figures of a checkpoint (KL, signal-to-noise, sigma) and of its predictions."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bnnify.enums import Figure, Task
from bnnify.errors import UsageError
from bnnify.formats import plots
from bnnify.formats.atomic import check_outputs
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.predictions import read_predictions
from bnnify.usecases import LOGGER_NAME
from bnnify.usecases.checkpoint_kl import checkpoint_kl
from bnnify.usecases.parameter_stats import parameter_stats
from bnnify.usecases.sources import CheckpointLike, as_checkpoint, file_paths, path_of

__all__ = ["CHECKPOINT_FIGURES", "PREDICTION_FIGURES", "PlotResult", "plot"]

logger = logging.getLogger(LOGGER_NAME)

CHECKPOINT_FIGURES = (Figure.LAYERS, Figure.SIGMA)
PREDICTION_FIGURES = (Figure.RELIABILITY, Figure.COVERAGE, Figure.BANDS)


@dataclass
class PlotResult:
    """The figures written, the numbers each one draws, and those left out with why.

    Attributes:
        figures: Figure name -> `{"path": ..., "drawn": {...}}` (see `formats.plots`).
        skipped: Figure name -> why it was not drawn (the inputs cannot give it).
    """

    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The result as `bnnify plot --json` prints it."""
        return {"schema": "bnnify.plot/1", "figures": self.figures, "skipped": self.skipped}


def plot(
    checkpoint: CheckpointLike | None = None,
    predictions: str | Path | None = None,
    *,
    figures: Sequence[Figure | str] | None = None,
    out_dir: str | Path | None = None,
    image_format: str = "png",
    seed: int | None = None,
    force: bool = False,
) -> PlotResult:
    """Draws the figures that a checkpoint and/or a predictions file allow.

    From a checkpoint: `layers` (KL(q || p) and mean signal-to-noise |mu| / sigma per
    parameter) and `sigma` (a histogram of every posterior sigma). From a predictions
    file of `bnnify predict --out` with its targets: `reliability` (classification)
    or `coverage` (regression), and `bands` (the predictive mean with its epistemic
    and total 95% bands, for one input feature and one output, from a file written
    with `--keep-samples --keep-inputs`). A figure is named `<stem>.<figure>.<format>`
    after its source file.

    Args:
        checkpoint: A variational checkpoint (file, sharded index or `Checkpoint`).
        predictions: A predictions file.
        figures: The figures wanted (default: every one the inputs allow; those they
            cannot give are listed in `skipped`).
        out_dir: Where the figures go (default: beside their source file).
        image_format: "png" or "svg".
        seed: Seed of Monte Carlo KL estimates (default: the checkpoint's).
        force: Replace existing figures.

    Raises:
        UsageError: Neither input given; a figure asked for that the inputs cannot
            give; matplotlib missing; a figure that exists without `force`.
        InputError: An input cannot be read.
    """
    if checkpoint is None and predictions is None:
        raise UsageError(
            "plot needs a checkpoint, a predictions file or both",
            hint="Give a checkpoint (KL, signal-to-noise, sigma) and/or --predictions FILE.",
        )
    wanted = list(Figure) if figures is None else [Figure.parse(f) for f in figures]
    valid, suffix = [f.value for f in plots.ImageFormat], str(image_format).lower()
    if suffix not in valid:
        raise UsageError(f"cannot draw {image_format!r} images", hint=f"Choose one of: {valid}.")
    plans, skipped = _plan(checkpoint, predictions, wanted, out_dir, suffix, seed, force)
    for source, kinds in (
        ("a checkpoint", CHECKPOINT_FIGURES),
        ("a predictions file", PREDICTION_FIGURES),
    ):
        for kind in kinds:
            if kind in wanted and kind not in plans:
                skipped.setdefault(kind.value, f"drawn from {source}, none given")
    missing = {f.value: skipped[f.value] for f in wanted if f not in plans}
    if figures is not None and missing:
        reasons = "; ".join(f"{name}: {why}" for name, why in missing.items())
        raise UsageError(f"cannot draw {sorted(missing)}: {reasons}")
    check_outputs(
        [path for path, _ in plans.values()],
        force=force,
        inputs=file_paths(checkpoint, predictions),
    )
    result = PlotResult(skipped=skipped)
    for kind, (path, draw) in plans.items():
        result.figures[kind.value] = {"path": str(path), "drawn": draw(path)}
    return result


Plan = dict[Figure, tuple[Path, Callable[[Path], dict[str, Any]]]]


def _plan(
    checkpoint: CheckpointLike | None,
    predictions: str | Path | None,
    wanted: list[Figure],
    out_dir: str | Path | None,
    suffix: str,
    seed: int | None,
    force: bool,
) -> tuple[Plan, dict[str, str]]:
    """Per wanted figure: its file and how to draw it, or why it cannot be drawn."""
    plans: Plan = {}
    skipped: dict[str, str] = {}
    sources = [(checkpoint, _checkpoint_figures), (predictions, _prediction_figures)]
    for source, figures_of in sources:
        if source is None:
            continue
        folder = Path(out_dir) if out_dir is not None else path_of(source).parent
        stem = _stem(path_of(source))
        for kind, draw in figures_of(source, seed, force).items():
            if kind not in wanted:
                continue
            if isinstance(draw, str):
                skipped[kind.value] = draw
            else:
                plans[kind] = (folder / f"{stem}.{kind.value}.{suffix}", draw)
    return plans, skipped


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".safetensors.index.json", ".safetensors"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _checkpoint_figures(source: CheckpointLike, seed: int | None, force: bool) -> dict:
    ckpt = as_checkpoint(source)

    def layers(path: Path) -> dict[str, Any]:
        report = checkpoint_kl(ckpt, seed=seed)
        kl = dict(zip(report.names, report.per_parameter, strict=True))
        snr = {row.name: row.snr_mean for row in parameter_stats(ckpt) if row.elements}
        return plots.layer_chart(kl, snr, path, force=force)

    def sigma(path: Path) -> dict[str, Any]:
        return plots.sigma_histogram(_sigmas(ckpt), path, force=force)

    return {Figure.LAYERS: layers, Figure.SIGMA: sigma}


@torch.no_grad()
def _sigmas(ckpt: Checkpoint) -> dict[str, Tensor]:
    return {name: ckpt.posterior(name).distribution.stddev for name in ckpt.parameters}


def _prediction_figures(source: str | Path, seed: int | None, force: bool) -> dict:
    predictions = read_predictions(source)
    tensors = predictions.tensors
    targets = tensors.get("targets")
    no_targets = "the predictions file holds no targets (predict with --targets)"
    if predictions.task is Task.CLASSIFICATION:
        regression = "a classification has no predictive intervals"
        if targets is None:
            return {
                Figure.RELIABILITY: no_targets,
                Figure.COVERAGE: regression,
                Figure.BANDS: regression,
            }

        def reliability(path: Path) -> dict[str, Any]:
            return plots.reliability_diagram(tensors["probs"], targets, path, force=force)

        return {
            Figure.RELIABILITY: reliability,
            Figure.COVERAGE: regression,
            Figure.BANDS: regression,
        }
    figures: dict[Figure, Any] = {Figure.RELIABILITY: "a regression has no class probabilities"}
    samples, noise = _mixture(tensors)
    if noise is None:
        figures[Figure.COVERAGE] = figures[Figure.BANDS] = (
            "the predictive has no noise scale (the checkpoint was not fitted): no density"
        )
        return figures
    if targets is None:
        figures[Figure.COVERAGE] = no_targets
    else:
        figures[Figure.COVERAGE] = lambda path: _coverage(
            samples, noise, targets, tensors, path, force
        )
    inputs = [name for name in tensors if name.startswith("input.")]
    if "samples" not in tensors or len(inputs) != 1:
        figures[Figure.BANDS] = (
            "bands need the samples and one input in the predictions file "
            "(predict with --keep-samples --keep-inputs)"
        )
    elif tensors[inputs[0]][0].numel() != 1 or tensors["mean"][0].numel() != 1:
        figures[Figure.BANDS] = "bands are drawn for one input feature and one output"
    else:
        x = tensors[inputs[0]]
        data = None if targets is None else (x, targets)
        figures[Figure.BANDS] = lambda path: plots.predictive_bands(
            x, tensors["samples"], noise, path, data=data, force=force
        )
    return figures


def _mixture(tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """The predictive as `regression_scores` takes it: samples and noise, or one Gaussian."""
    noise = tensors["aleatoric_std"]
    if "samples" in tensors:
        if not bool((noise > 0).all()):
            return tensors["samples"], None
        return tensors["samples"], noise
    std = tensors["std"]
    if not bool((std > 0).all()):
        return tensors["mean"][None], None
    return tensors["mean"][None], std


def _coverage(
    samples: Tensor,
    noise: Tensor,
    targets: Tensor,
    tensors: dict[str, Tensor],
    path: Path,
    force: bool,
) -> dict[str, Any]:
    if "samples" not in tensors:
        logger.warning(
            "the predictions file holds no samples: the coverage drawn is that of a Gaussian "
            "with the predictive mean and std, not of the mixture that predict scores "
            "(predict with --keep-samples)"
        )
    drawn = plots.coverage_curve(samples, noise, targets, path, force=force)
    drawn["predictive"] = "mixture" if "samples" in tensors else "gaussian"
    return drawn
