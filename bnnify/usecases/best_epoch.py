"""Which epoch a fit keeps: the best on validation data (early stopping), or the last."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["BestEpoch", "last_epoch"]


class BestEpoch:
    """A copy of the trained tensors at the epoch of best validation log-likelihood.

    The starting point (`start_epoch`, before any step) is a candidate too, so a fit
    never ends worse on validation than it started. Memory: one copy of the trained
    tensors (the posterior's `mu` and `rho` and the noise scale), made at each
    improvement.

    Args:
        tensors: The trained tensors; `restore` copies the kept values back into them.
        patience: Epochs without improvement after which `exhausted` is true (0: never).
        start_epoch: The number of the starting state (0, or the epochs of a resumed fit).
        start_score: Validation log-likelihood of the starting state.

    Example:
        >>> w = torch.zeros(2)
        >>> best = BestEpoch([w], patience=2, start_epoch=0, start_score=-3.0)
        >>> for epoch, score in enumerate([-2.0, -1.0, -1.5, -1.2], start=1):
        ...     _ = w.fill_(epoch)
        ...     _ = best.consider(epoch, score)
        >>> best.epoch, best.exhausted
        (2, True)
        >>> best.restore(); w.tolist()
        [2.0, 2.0]
    """

    def __init__(
        self, tensors: Iterable[Tensor], patience: int, start_epoch: int, start_score: float
    ):
        self._tensors = list(tensors)
        self._kept = [t.detach().clone() for t in self._tensors]
        self.patience = patience
        self.start_epoch = start_epoch
        self.epoch = start_epoch
        self.score = _score(start_score)
        self.last = start_epoch

    def consider(self, epoch: int, score: float) -> bool:
        """Records `epoch`'s validation log-likelihood; copies its state if it is the best.

        Returns:
            Whether `epoch` improved on every earlier one (ties keep the earlier).
        """
        self.last = epoch
        score = _score(score)
        if not score > self.score:
            return False
        self.epoch, self.score = epoch, score
        with torch.no_grad():
            for kept, tensor in zip(self._kept, self._tensors, strict=True):
                kept.copy_(tensor)
        return True

    @property
    def stale(self) -> int:
        """Epochs since the last improvement."""
        return self.last - self.epoch

    @property
    def exhausted(self) -> bool:
        """Whether the patience has run out (never with patience 0)."""
        return self.patience > 0 and self.stale >= self.patience

    @torch.no_grad()
    def restore(self) -> None:
        """Puts the kept state back into the trained tensors (bit for bit)."""
        for kept, tensor in zip(self._kept, self._tensors, strict=True):
            tensor.copy_(kept)

    def summary(self) -> dict[str, Any]:
        """What was kept and why (the `selection` of `bnnify fit`'s output)."""
        if self.epoch == self.start_epoch:
            why = "no epoch improved the validation log-likelihood of the starting point"
        else:
            why = "best validation log-likelihood"
        reason = f"{why} {self.score:.4g}"
        if self.exhausted:
            reason += f"; stopped early: no improvement for {self.stale} epochs"
        return {
            "criterion": "val_log_likelihood",
            "start_epoch": self.start_epoch,
            "kept_epoch": self.epoch,
            "last_epoch": self.last,
            "val_log_likelihood": self.score if math.isfinite(self.score) else None,
            "patience": self.patience,
            "stopped_early": self.exhausted,
            "reason": reason,
        }


def last_epoch(start: int, last: int) -> dict[str, Any]:
    """The selection of a fit without validation data: the last epoch, unguarded."""
    return {
        "criterion": "last_epoch",
        "start_epoch": start,
        "kept_epoch": last,
        "last_epoch": last,
        "val_log_likelihood": None,
        "patience": None,
        "stopped_early": False,
        "reason": "the last epoch: without validation data nothing guards against over-fitting",
    }


def _score(value: float) -> float:
    """A log-likelihood to compare: NaN ranks below everything."""
    return value if not math.isnan(value) else -math.inf
