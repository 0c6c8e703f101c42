"""`fit --search`: a small grid of prior scale, initial posterior spread and KL weight,
each point fitted from the checkpoint's means and scored on validation data only."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bnnify.bnn.keys import posterior_key
from bnnify.bnn.likelihood import Likelihood
from bnnify.bnn.posteriors import PretrainedGaussianPosterior
from bnnify.errors import UsageError
from bnnify.formats.data import Dataset
from bnnify.formats.spec import ConversionSpec
from bnnify.usecases import LOGGER_NAME
from bnnify.usecases.runner import Runner
from bnnify.usecases.training import FitSettings, Training, train

__all__ = ["GRID", "GridPoint", "SearchOutcome", "grid", "search"]

logger = logging.getLogger(LOGGER_NAME)

# The grid of `fit --search` (README, "fit --search"): 3 x 2 x 2 = 12 points.
GRID = {
    "prior_scale": (0.1, 1.0),
    "posterior_delta": (0.01, 0.03, 0.1),
    "kl_weight": (0.1, 1.0),
}
# The argument holding each searchable prior's scale.
_SCALE_ARGUMENT = {"gaussian": "sigma", "normal": "sigma", "laplace": "scale"}
_PRETRAINED = ("pretrained_gaussian", "pretrained_normal")


@dataclass(frozen=True)
class GridPoint:
    """One setting of the search: the prior's scale (`sigma` of a Gaussian prior, `scale`
    of a Laplace one), the initial posterior spread `sigma = posterior_delta * |mu|`, and
    the KL weight."""

    prior_scale: float
    posterior_delta: float
    kl_weight: float


def grid() -> list[GridPoint]:
    """The points of `GRID`, in a fixed order (ties go to the earlier point)."""
    return [GridPoint(*values) for values in itertools.product(*GRID.values())]


@dataclass
class SearchOutcome:
    """The best point's fitted model, and every point's score.

    Attributes:
        runner: The model fitted at the best point (holding its kept epoch's state).
        likelihood: Its likelihood (the fitted noise scale).
        training: Its `Training` (history and selection).
        spec: The checkpoint's spec with the best point's prior and initial spread.
        best: The index of the best point in `points`.
        points: Per point: its settings, `val_log_likelihood` (of its kept epoch),
            `kept_epoch`, `last_epoch`, `stopped_early` and `seconds`.
        seconds: Time the whole search took.
    """

    runner: Runner
    likelihood: Likelihood
    training: Training
    spec: ConversionSpec
    best: int
    points: list[dict[str, Any]]
    seconds: float

    @property
    def kl_weight(self) -> float:
        """The KL weight of the best point."""
        return self.points[self.best]["kl_weight"]

    def metadata(self) -> dict[str, Any]:
        """What the fitted checkpoint records beyond the fit: the grid's results, and the
        spec with the best point's prior and initial spread."""
        return {"bnnify.search": self.record(), "bnnify.spec": self.spec.to_json()}

    def record(self) -> dict[str, Any]:
        """The search as recorded in the checkpoint (`bnnify.search`) and printed."""
        return {
            "grid": {key: list(values) for key, values in GRID.items()},
            "criterion": "val_log_likelihood",
            "best": self.best,
            "points": self.points,
            "seconds": self.seconds,
        }


def search_spec(spec: ConversionSpec, point: GridPoint) -> ConversionSpec:
    """`spec` with the prior scale and the initial spread of `point`.

    Raises:
        UsageError: If the prior has no scale the search knows, or the posterior is
            not a Gaussian with `mu` and `rho`.
    """
    prior, kwargs = spec.prior
    if prior not in _SCALE_ARGUMENT:
        raise UsageError(
            f"--search varies the scale of a gaussian or laplace prior, and this "
            f"checkpoint's prior is {prior!r}",
            hint="Convert with --prior gaussian (the default) or --prior laplace, or fit "
            "without --search.",
        )
    posterior, options = spec.posterior
    if posterior in _PRETRAINED:
        keep = {k: v for k, v in options.items() if k not in ("rho", "sigma", "delta")}
        options = {**keep, "delta": point.posterior_delta}
    return dataclasses.replace(
        spec,
        prior=(prior, {**kwargs, _SCALE_ARGUMENT[prior]: point.prior_scale}),
        posterior=(posterior, options),
    )


@torch.no_grad()
def respread_(runner: Runner, delta: float, min_sigma: float = 1e-6) -> None:
    """Sets, in place, every posterior spread to `delta * |mu|` (floored at `min_sigma`).

    Raises:
        UsageError: If a posterior has no `mu` and `rho` (not a Gaussian posterior).
    """
    state = runner.bnn.variational_state()
    for name in runner.bnn.reparametrized_names():
        mu, rho = state.get(posterior_key(name, "mu")), state.get(posterior_key(name, "rho"))
        if mu is None or rho is None:
            raise UsageError(
                f"--search sets the spread of Gaussian posteriors (mu, rho), and {name!r} "
                "has another posterior",
                hint="Convert with the default posterior (pretrained_gaussian), or fit "
                "without --search.",
            )
        PretrainedGaussianPosterior.initialize_(mu, rho, mu, delta=delta, min_sigma=min_sigma)


def search(
    open_runner: Callable[[tuple[str, dict]], Runner],
    make_likelihood: Callable[[], Likelihood],
    spec: ConversionSpec,
    data: Dataset,
    val: Dataset,
    settings: FitSettings,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> SearchOutcome:
    """Fits every point of the grid from the checkpoint's means; keeps the best on `val`.

    Each point starts from the same means, with the same seed (the same data order and
    weight noise), and keeps its own best epoch on `val` (early stopping with
    `settings.patience`); points are ranked by that epoch's validation log-likelihood.
    Memory: two models at a time (the best so far and the one being fitted).

    Args:
        open_runner: Builds a fresh model with the given prior spec.
        make_likelihood: A fresh likelihood.
        spec: The checkpoint's conversion spec.
        data: Training data.
        val: Validation data (the only data the points are compared on).
        settings: The fit's settings (`kl_weight` is replaced by each point's).
        on_epoch: Called with each epoch's record, `point` (its index) added.
        on_point: Called with each point's result when it is done.
    """
    start = time.perf_counter()
    min_sigma = spec.posterior[1].get("min_sigma", 1e-6)
    points: list[dict[str, Any]] = []
    best: tuple[float, int, Runner, Likelihood, Training, ConversionSpec] | None = None
    for index, point in enumerate(grid()):
        began = time.perf_counter()
        chosen = search_spec(spec, point)
        runner = open_runner(chosen.prior)
        respread_(runner, point.posterior_delta, min_sigma)
        likelihood = make_likelihood()
        tagged = None if on_epoch is None else _tagged(on_epoch, index)
        point_settings = dataclasses.replace(settings, kl_weight=point.kl_weight)
        training = train(runner, likelihood, data, point_settings, val=val, on_epoch=tagged)
        selection = training.selection
        result = {
            "point": index,
            **dataclasses.asdict(point),
            "val_log_likelihood": selection["val_log_likelihood"],
            "kept_epoch": selection["kept_epoch"],
            "last_epoch": selection["last_epoch"],
            "stopped_early": selection["stopped_early"],
            "seconds": time.perf_counter() - began,
        }
        points.append(result)
        logger.info(
            "Search point %d of %d (%s): validation log-likelihood %.4g at epoch %d",
            index + 1,
            len(grid()),
            _describe(point),
            selection["val_log_likelihood"] or float("nan"),
            selection["kept_epoch"],
        )
        if on_point is not None:
            on_point(result)
        score = _rank(selection["val_log_likelihood"])
        if best is None or score > best[0]:
            best = (score, index, runner, likelihood, training, chosen)
    assert best is not None
    _, index, runner, likelihood, training, chosen = best
    seconds = time.perf_counter() - start
    return SearchOutcome(runner, likelihood, training, chosen, index, points, seconds)


def _tagged(on_epoch: Callable[[dict[str, Any]], None], index: int) -> Callable:
    return lambda record: on_epoch({**record, "point": index})


def _describe(point: GridPoint) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in dataclasses.asdict(point).items())


def _rank(score: float | None) -> float:
    return float("-inf") if score is None else score
