"""What a fit did: the record `bnnify fit` prints (JSON Lines) and keeps in the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnnify.enums import Task
from bnnify.usecases.training import FitSettings, settings_json

__all__ = ["EPOCH_SCHEMA", "POINT_SCHEMA", "SCHEMA", "FitResult"]

# `bnnify fit --json` prints JSON Lines: an EPOCH_SCHEMA object per epoch (POINT_SCHEMA
# after each point of a search), then the SCHEMA summary (`FitResult.to_json`).
EPOCH_SCHEMA = "bnnify.fit.epoch/1"
POINT_SCHEMA = "bnnify.fit.search_point/1"
SCHEMA = "bnnify.fit/1"


@dataclass
class FitResult:
    """What a fit did (what `bnnify fit` prints, and records in the fitted checkpoint).

    Attributes:
        output: The fitted checkpoint (written by the process of rank 0 only).
        task: The task fitted.
        settings: The settings used.
        n_train: Training examples.
        n_val: Validation examples (0 without validation).
        data: Name of the training data.
        model: `{"name": ..., "sha256": ...}` of the model file.
        history: One record per epoch, those of the fits resumed included: loss,
            nll, kl, elbo (per example), beta, noise, and `val` metrics and
            `improved` with validation data.
        selection: Which epoch the checkpoint holds and why: `kept_epoch`,
            `last_epoch`, `criterion` ("val_log_likelihood" or "last_epoch"),
            `val_log_likelihood`, `patience`, `stopped_early`, `reason`.
        start: The starting state's `epoch`, validation metrics (`val`) and noise
            scale (regression), None without validation.
        val_data: Name of the validation data (None without).
        inputs: The names of the model's per-example inputs, in order.
        model_args: The constant arguments of the model's `forward`.
        call: What each parameter of `forward` received (`"input NAME"` or a constant).
        val_estimator: How the validation predictions were sampled
            (`{"estimator": ..., "reason": ...}`), None without validation.
        search: With `search=True`, the grid's results (`SearchOutcome.record`).
    """

    output: Path
    task: Task
    settings: FitSettings
    n_train: int
    n_val: int
    data: str
    model: dict[str, str]
    history: list[dict[str, Any]]
    selection: dict[str, Any] = field(default_factory=dict)
    start: dict[str, Any] | None = None
    val_data: str | None = None
    inputs: list[str] = field(default_factory=lambda: ["x"])
    model_args: dict[str, Any] = field(default_factory=dict)
    call: dict[str, Any] = field(default_factory=dict)
    val_estimator: dict[str, str] | None = None
    search: dict[str, Any] | None = None

    @property
    def final(self) -> dict[str, Any]:
        """The record of the last epoch run."""
        return self.history[-1]

    @property
    def kept(self) -> dict[str, Any]:
        """The record of the epoch whose state was written (`selection["kept_epoch"]`)."""
        epoch = self.selection.get("kept_epoch", self.final["epoch"])
        for record in reversed(self.history):
            if record["epoch"] == epoch:
                return record
        assert self.start is not None and self.start["epoch"] == epoch
        return self.start

    def info(self) -> dict[str, Any]:
        """The fit's record in the checkpoint's metadata (`bnnify.fit`)."""
        return {
            "task": self.task.value,
            "settings": settings_json(self.settings),
            "n_train": self.n_train,
            "n_val": self.n_val,
            "data": self.data,
            "val_data": self.val_data,
            "model": self.model,
            "inputs": self.inputs,
            "model_args": self.model_args,
            "call": self.call,
            "val_estimator": self.val_estimator,
            "selection": self.selection,
            "start": self.start,
            "kept": self.kept,
            "final": self.final,
            "history": self.history,
        }

    def to_json(self) -> dict[str, Any]:
        """The summary `bnnify fit --json` prints last (schema `bnnify.fit/1`).

        The metadata's record without the history (streamed one line per epoch),
        with `epochs_run` (by this fit, not those resumed) and, after a search, its grid results.
        """
        info = {k: v for k, v in self.info().items() if k != "history"}
        summary = {"schema": SCHEMA, "output": str(self.output), **info}
        summary["epochs_run"] = self.selection["last_epoch"] - self.selection["start_epoch"]
        summary["search"] = self.search
        return summary
