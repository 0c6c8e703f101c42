"""Tests of bnnify.usecases.best_epoch: the best epoch on validation data, kept bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from bnnify.usecases.best_epoch import BestEpoch, last_epoch


def run(scores: list[float], patience: int = 0, start_score: float = -10.0, seed: int = 0):
    """Feeds `scores` (epochs 1, 2, ...), the tensors random at each epoch; returns the
    tracker, the tensors and every epoch's values."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.zeros(3, 2), torch.zeros(5)]
    values = {0: [t.clone() for t in tensors]}
    best = BestEpoch(tensors, patience, start_epoch=0, start_score=start_score)
    for epoch, score in enumerate(scores, start=1):
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=generator))
        values[epoch] = [t.clone() for t in tensors]
        best.consider(epoch, score)
        if best.exhausted:
            break
    return best, tensors, values


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "scores", [[-3.0, -1.0, -2.0, -4.0], [-1.0, -0.5, -0.2], [-11.0, -12.0], [-5.0, -5.0, -4.9]]
)
def test_the_kept_state_is_that_of_the_best_score_bit_for_bit(scores, seed):
    best, tensors, values = run(scores, seed=seed)
    everything = [-10.0, *scores]
    expected = max(range(len(everything)), key=lambda i: (everything[i], -i))  # first best
    assert best.epoch == expected and best.score == everything[expected]
    best.restore()
    for restored, kept in zip(tensors, values[expected], strict=True):
        assert torch.equal(restored, kept)


def test_no_improvement_keeps_the_starting_point():
    best, tensors, _ = run([-11.0, -12.0])
    best.restore()
    assert best.epoch == 0 and all(t.eq(0).all() for t in tensors)
    summary = best.summary()
    assert summary["kept_epoch"] == 0 and summary["last_epoch"] == 2
    assert "no epoch improved" in summary["reason"]


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_patience_stops_that_many_epochs_after_the_best(patience):
    best, _, _ = run([-1.0] + [-2.0] * 10, patience=patience)
    assert best.exhausted and best.last - best.epoch == patience
    summary = best.summary()
    assert summary["stopped_early"] and summary["last_epoch"] == 1 + patience
    assert f"no improvement for {patience} epochs" in summary["reason"]


def test_patience_zero_never_stops():
    best, _, _ = run([-1.0] + [-2.0] * 30, patience=0)
    assert not best.exhausted and best.last == 31 and not best.summary()["stopped_early"]


def test_nan_is_never_the_best():
    best, _, _ = run([math.nan, -9.0, math.nan], start_score=math.nan)
    assert best.epoch == 2
    nothing, _, _ = run([math.nan], start_score=math.nan)
    assert nothing.epoch == 0 and nothing.summary()["val_log_likelihood"] is None


def test_without_validation_the_last_epoch_is_kept_and_said_to_be_unguarded():
    summary = last_epoch(2, 7)
    assert summary["kept_epoch"] == summary["last_epoch"] == 7
    assert summary["criterion"] == "last_epoch" and summary["start_epoch"] == 2
    assert "nothing guards against over-fitting" in summary["reason"]
