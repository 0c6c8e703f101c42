"""Figures of a BNN's predictive and posterior, drawn from tensors into PNG or SVG files."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bnnify.bnn.metrics import (
    CALIBRATION_LEVELS,
    ECE_BINS,
    expected_calibration_error,
    interval_coverage,
    quantile_calibration_error,
    quantile_coverage,
    reliability_bins,
)
from bnnify.bnn.mixture import gaussian_mixture_cdf, gaussian_mixture_quantile
from bnnify.errors import InvalidArgumentError, UsageError
from bnnify.formats.atomic import AtomicOutputs

__all__ = [
    "ImageFormat",
    "coverage_curve",
    "layer_chart",
    "predictive_bands",
    "reliability_diagram",
    "sigma_histogram",
]

_SIZE = (6.4, 4.8)  # inches; at _DPI, a 640 x 480 PNG
_DPI = 100
# Values spread over this ratio or more are drawn on a log scale.
_LOG_RATIO = 100.0
_TITLES = {"kl": "KL(q || p)", "snr": "signal-to-noise |mu| / sigma"}


class ImageFormat(str, Enum):
    """The file formats figures are written in."""

    PNG = "png"
    SVG = "svg"


def _figure_class() -> Any:
    """matplotlib's `Figure`, drawn without pyplot: no display, no global figure state."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise UsageError(
            "drawing figures needs matplotlib, which is not installed",
            hint="Install it with: pip install 'bnnify[plot]'",
        ) from error
    return Figure


def _image_format(path: str | Path, image_format: str | None) -> ImageFormat:
    suffix = Path(path).suffix.lower().lstrip(".")
    valid = [f.value for f in ImageFormat]
    if image_format is None:
        image_format = suffix or ImageFormat.PNG.value
    if image_format not in valid or (suffix and suffix != image_format):
        raise UsageError(
            f"cannot write a {image_format!r} figure to {str(path)!r}; formats: {valid}",
            hint="Name the file .png (the default) or .svg, matching the format.",
        )
    return ImageFormat(image_format)


class _Drawing:
    """One figure to one file: checks first, then draws and writes it atomically."""

    def __init__(self, path: str | Path, image_format: str | None, force: bool):
        self.figure_class = _figure_class()
        self.format = _image_format(path, image_format)
        self.path = path
        self.outputs = AtomicOutputs([path], force=force)

    def write(self, draw: Any, size: tuple[float, float] = _SIZE) -> None:
        with self.outputs:
            figure = self.figure_class(figsize=size, dpi=_DPI, layout="constrained")
            draw(figure)
            metadata = {"Date": None} if self.format is ImageFormat.SVG else None
            figure.savefig(
                self.outputs.temp(self.path),
                format=self.format.value,
                dpi=_DPI,
                metadata=metadata,
            )


def reliability_diagram(
    probs: Tensor,
    labels: Tensor,
    path: str | Path,
    *,
    bins: int = ECE_BINS,
    image_format: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Accuracy against confidence per bin, with the counts below and the ECE in the title.

    Args:
        probs: Predictive probabilities `(..., C)`.
        labels: Class indices of the leading shape of `probs`.
        path: The image file (.png or .svg).
        bins: Equal-width confidence bins, as in `reliability_bins`.
        image_format: "png" or "svg" (default: from the suffix, else PNG).
        force: Replace an existing file.

    Returns:
        The numbers drawn: `edges`, `counts`, `accuracy`, `confidence`, `ece`, `bins`.

    Raises:
        UsageError: matplotlib is missing, or the path or format is unusable.
        InputError: The labels do not fit the predictions.
    """
    drawing = _Drawing(path, image_format, force)
    table = {k: v.tolist() for k, v in reliability_bins(probs, labels, bins).items()}
    drawn = {**table, "ece": expected_calibration_error(probs, labels, bins), "bins": bins}

    def draw(figure: Any) -> None:
        top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        edges, width = table["edges"][:-1], 1 / bins
        top.bar(edges, table["accuracy"], width=width, align="edge", edgecolor="black")
        top.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
        top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        top.set_title(f"Reliability: ECE = {drawn['ece']:.4f} ({bins} bins)")
        top.legend(loc="upper left")
        bottom.bar(edges, table["counts"], width=width, align="edge", edgecolor="black")
        bottom.set(xlabel="confidence (top probability)", ylabel="examples")

    drawing.write(draw)
    return drawn


def coverage_curve(
    samples: Tensor,
    noise: float | Tensor,
    y: Tensor,
    path: str | Path,
    *,
    levels: Sequence[float] = CALIBRATION_LEVELS,
    image_format: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Observed against nominal coverage of the regression predictive, at each level.

    Two curves: the central intervals of level c (`interval_coverage`) and the one-sided
    P(y <= q_p) (`quantile_coverage`), whose mean gap to the diagonal is the calibration
    error in the title. Arguments as in `regression_scores`, and `path`, `image_format`,
    `force` as in `reliability_diagram`.

    Returns:
        The numbers drawn: `levels`, `interval_coverage`, `quantile_coverage`,
        `calibration_error`.
    """
    drawing = _Drawing(path, image_format, force)
    pit = gaussian_mixture_cdf(samples, noise, y)
    drawn = {
        "levels": [float(level) for level in levels],
        "interval_coverage": interval_coverage(pit, levels).tolist(),
        "quantile_coverage": quantile_coverage(pit, levels).tolist(),
        "calibration_error": quantile_calibration_error(pit, levels),
    }

    def draw(figure: Any) -> None:
        axes = figure.subplots()
        axes.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
        axes.plot(drawn["levels"], drawn["interval_coverage"], "o-", label="central interval")
        axes.plot(drawn["levels"], drawn["quantile_coverage"], "s-", label="P(y <= q_p)")
        axes.set(xlabel="nominal level", ylabel="observed fraction", xlim=(0, 1), ylim=(0, 1))
        axes.set_title(f"Coverage: calibration error = {drawn['calibration_error']:.4f}")
        axes.legend(loc="upper left")

    drawing.write(draw)
    return drawn


def _finite(values: Tensor, what: str) -> Tensor:
    values = values.detach().double().reshape(-1)
    if values.numel() == 0 or not torch.isfinite(values).all():
        raise InvalidArgumentError(f"{what} must be finite numbers, at least one")
    return values


def _log_scale(values: Tensor) -> bool:
    return bool((values > 0).all()) and float(values.max()) >= _LOG_RATIO * float(values.min())


def layer_chart(
    kl: Mapping[str, float] | None,
    snr: Mapping[str, float] | None,
    path: str | Path,
    *,
    image_format: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Horizontal bars per layer or parameter: KL(q || p) and signal-to-noise |mu| / sigma.

    Each panel is on a log scale when its values are positive and span a factor of 100
    or more. `kl` or `snr` may be None (one panel). Returns, per panel, the `names`,
    `values` and `log_scale` drawn, and the figure's `size` in pixels.
    """
    given = {"kl": kl, "snr": snr}
    panels = {key: values for key, values in given.items() if values is not None}
    if not panels:
        raise InvalidArgumentError("layer_chart needs kl, snr or both")
    drawing = _Drawing(path, image_format, force)
    drawn: dict[str, Any] = {}
    for key, values in panels.items():
        tensor = _finite(torch.tensor(list(values.values()), dtype=torch.float64), key)
        drawn[key] = {"names": list(values), "values": tensor.tolist()}
        drawn[key]["log_scale"] = _log_scale(tensor)
    rows = max(len(values) for values in panels.values())
    size = (_SIZE[0] * len(panels), max(_SIZE[1], 1.0 + 0.22 * rows))
    drawn["size"] = [round(size[0] * _DPI), round(size[1] * _DPI)]

    def draw(figure: Any) -> None:
        grid = figure.subplots(1, len(panels), squeeze=False).flat
        for axes, key in zip(grid, panels, strict=True):
            axes.barh(drawn[key]["names"], drawn[key]["values"])
            axes.invert_yaxis()  # first name on top
            axes.set(title=_TITLES[key], xscale="log" if drawn[key]["log_scale"] else "linear")

    drawing.write(draw, size)
    return drawn


def sigma_histogram(
    sigma: Tensor | Mapping[str, Tensor],
    path: str | Path,
    *,
    bins: int = 50,
    image_format: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Histogram of the posterior standard deviations of every weight, pooled.

    Bins are log-spaced when sigma spans a factor of 100 or more. Returns the `edges`,
    `counts`, `log_scale`, and the `count`, `min`, `median` and `max` of sigma.
    """
    if isinstance(sigma, Mapping):
        sigma = torch.cat([s.detach().double().reshape(-1) for s in sigma.values()])
    values = _finite(sigma, "sigma")
    if not (values > 0).all():
        raise InvalidArgumentError(f"sigma must be positive; found {float(values.min())}")
    drawing = _Drawing(path, image_format, force)
    low, high, log_scale = float(values.min()), float(values.max()), _log_scale(values)
    if log_scale:
        edges = torch.logspace(math.log10(low), math.log10(high), bins + 1, dtype=torch.float64)
    else:
        edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
        if high == low:
            edges = torch.linspace(0.5 * low, 1.5 * low, bins + 1, dtype=torch.float64)
    # logspace rounds its ends: pin them so that the extremes are counted.
    edges[0], edges[-1] = min(float(edges[0]), low), max(float(edges[-1]), high)
    counts = torch.histogram(values, bins=edges).hist.long()
    drawn = {
        "edges": edges.tolist(),
        "counts": counts.tolist(),
        "log_scale": log_scale,
        "count": values.numel(),
        "min": low,
        "median": float(values.median()),
        "max": high,
    }

    def draw(figure: Any) -> None:
        axes = figure.subplots()
        axes.stairs(drawn["counts"], drawn["edges"], fill=True)
        axes.set(
            xlabel="posterior sigma", ylabel="weights", xscale="log" if log_scale else "linear"
        )
        axes.set_title(f"sigma of {values.numel()} weights, median {drawn['median']:.3g}")

    drawing.write(draw)
    return drawn


def predictive_bands(
    x: Tensor,
    samples: Tensor,
    noise: float | Tensor,
    path: str | Path,
    *,
    data: tuple[Tensor, Tensor] | None = None,
    level: float = 0.95,
    image_format: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """For one input feature: the predictive mean, its epistemic and total bands, the data.

    The total band is the central interval of level `level` of the predictive mixture
    (1/S) sum_s N(f_s(x), noise^2), from its exact quantiles; the epistemic band is that
    of the sampled functions f_s(x) alone (their empirical quantiles, interpolated).

    Args:
        x: Inputs `(N,)` or `(N, 1)`, in any order.
        samples: Outputs `(S, N)` or `(S, N, 1)` of S weight samples.
        noise: Positive scale(s) broadcastable to `samples`.
        path: The image file (.png or .svg).
        data: Points `(x, y)` to draw as dots (training or test data).
        level: Level of both bands.
        image_format: "png" or "svg" (default: from the suffix, else PNG).
        force: Replace an existing file.

    Returns:
        The numbers drawn, sorted by x: `x`, `mean`, `epistemic_lower`, `epistemic_upper`,
        `total_lower`, `total_upper`, and `level`.
    """
    n = x.shape[0] if x.dim() else 0
    if x.numel() != n or samples.dim() < 2 or samples[0].numel() != n or n == 0:
        raise InvalidArgumentError(
            f"bands are drawn for one input and one output: inputs {tuple(x.shape)}, "
            f"outputs {tuple(samples.shape)} (samples, examples[, 1])",
            hint="Draw bands only for models of one input feature and one output.",
        )
    if not 0 < level < 1:
        raise InvalidArgumentError(f"level must lie in (0, 1); got {level}")
    drawing = _Drawing(path, image_format, force)
    ends = [(1 - level) / 2, (1 + level) / 2]
    bounds = gaussian_mixture_quantile(samples, noise, ends)
    functions = samples.detach().double().reshape(samples.shape[0], n)
    spread = torch.quantile(functions, torch.tensor(ends, dtype=torch.float64), dim=0)
    order = x.reshape(-1).argsort()
    drawn = {
        "x": x.reshape(-1)[order].double().tolist(),
        "mean": functions.mean(0)[order].tolist(),
        "epistemic_lower": spread[0, order].tolist(),
        "epistemic_upper": spread[1, order].tolist(),
        "total_lower": bounds[0].reshape(-1)[order].tolist(),
        "total_upper": bounds[1].reshape(-1)[order].tolist(),
        "level": level,
    }

    def draw(figure: Any) -> None:
        axes = figure.subplots()
        percent = f"{100 * level:g}%"
        axes.fill_between(
            drawn["x"],
            drawn["total_lower"],
            drawn["total_upper"],
            alpha=0.2,
            color="C0",
            label=f"total {percent}",
        )
        axes.fill_between(
            drawn["x"],
            drawn["epistemic_lower"],
            drawn["epistemic_upper"],
            alpha=0.45,
            color="C0",
            label=f"epistemic {percent}",
        )
        axes.plot(drawn["x"], drawn["mean"], color="black", label="predictive mean")
        if data is not None:
            axes.scatter(data[0].reshape(-1), data[1].reshape(-1), s=8, color="C3", label="data")
        axes.set(xlabel="x", ylabel="y")
        axes.legend(loc="best")

    drawing.write(draw)
    return drawn
