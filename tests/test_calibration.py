"""Tests of the post-hoc calibration maths: temperature and spread scale, known answers."""

from __future__ import annotations

import math

import pytest
import torch

from bnnify.bnn.calibration import (
    BOUNDS,
    categorical_nll,
    fit_spread_scale,
    fit_temperature,
    minimise_log,
    scale_spread,
    temper,
)
from bnnify.bnn.metrics import classification_scores, classification_summary, regression_summary
from bnnify.errors import InputError, InvalidArgumentError


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_temper_divides_each_samples_logits():
    logits = torch.tensor([[[2.0, -1.0]], [[0.5, 4.0]]])
    assert torch.allclose(temper(logits, 2.0), logits / 2)


def test_scale_spread_keeps_the_mean_and_scales_both_stds():
    samples = torch.randn(16, 30, 1, generator=_generator())
    scaled, noise = scale_spread(samples, 0.3, 1.7)
    before, after = regression_summary(samples, 0.3), regression_summary(scaled, noise)
    assert torch.allclose(after["mean"], before["mean"], atol=1e-6)
    assert torch.allclose(after["epistemic_std"], 1.7 * before["epistemic_std"], atol=1e-6)
    assert torch.allclose(after["std"], 1.7 * before["std"], atol=1e-6)
    assert noise == pytest.approx(0.51)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_categorical_nll_is_the_nll_of_the_tempered_mean_probabilities(temperature):
    logits = 3 * torch.randn(5, 40, 4, generator=_generator(1))
    labels = torch.randint(0, 4, (40,), generator=_generator(2))
    # Independently: average the softmax of each sample, then the mean -log p(label).
    probs = torch.softmax(logits.double() / temperature, -1).mean(0)
    expected = -probs[torch.arange(40), labels].log().mean()
    assert categorical_nll(logits, labels, temperature) == pytest.approx(float(expected))
    scores = classification_scores(classification_summary(logits / temperature)["probs"], labels)
    assert categorical_nll(logits, labels, temperature) == pytest.approx(scores["nll"])


def test_categorical_nll_in_chunks_equals_in_one_piece(monkeypatch):
    logits = torch.randn(3, 50, 5, generator=_generator(3))
    labels = torch.randint(0, 5, (50,), generator=_generator(4))
    whole = categorical_nll(logits, labels, 1.3)
    monkeypatch.setattr("bnnify.bnn.calibration._CHUNK", 7)
    assert categorical_nll(logits, labels, 1.3) == pytest.approx(whole, rel=1e-12)


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_temperature_of_labels_drawn_from_tempered_logits_is_recovered(true_temperature):
    # A perfectly calibrated set: labels drawn from softmax(z / T0); its MLE of T is T0.
    generator = _generator(5)
    logits = 2 * torch.randn(1, 20000, 3, generator=generator)
    probs = torch.softmax(logits[0] / true_temperature, -1)
    labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    fit = fit_temperature(logits, labels)
    assert fit.value == pytest.approx(true_temperature, rel=0.05)
    assert fit.nll_after <= fit.nll_before and not fit.at_bound


def test_temperature_of_separable_labels_lies_at_the_bound():
    logits = torch.tensor([[[3.0, 0.0], [0.0, 3.0], [2.0, 1.0]]])
    fit = fit_temperature(logits, torch.tensor([0, 1, 0]))
    assert fit.value == pytest.approx(BOUNDS[0]) and fit.at_bound


def test_spread_scale_of_one_gaussian_is_its_closed_form():
    # One component N(0, (s sigma)^2): the likelihood is maximal at s = rms(y) / sigma.
    y = 0.7 * torch.randn(5000, 1, generator=_generator(6))
    samples, sigma = torch.zeros(1, 5000, 1), 0.2
    fit = fit_spread_scale(samples, sigma, y)
    expected = float(y.double().square().mean().sqrt()) / sigma
    assert fit.value == pytest.approx(expected, rel=1e-4)
    assert fit.nll_after < fit.nll_before


def test_spread_scale_of_a_calibrated_mixture_is_near_one():
    generator = _generator(7)
    n, s, noise = 4000, 8, 0.3
    centres = torch.randn(1, n, 1, generator=generator)
    samples = centres + 0.5 * torch.randn(s, n, 1, generator=generator)
    # Targets from the mixture itself: a component chosen at random, plus its noise.
    pick = torch.randint(0, s, (n,), generator=generator)
    y = samples[pick, torch.arange(n)] + noise * torch.randn(n, 1, generator=generator)
    assert fit_spread_scale(samples, noise, y).value == pytest.approx(1.0, abs=0.05)


def test_spread_scale_refuses_what_it_cannot_fit():
    with pytest.raises(InvalidArgumentError, match="positive noise scale"):
        fit_spread_scale(torch.zeros(2, 3, 1), 0.0, torch.zeros(3, 1))
    with pytest.raises(InputError, match="do not match"):
        fit_spread_scale(torch.zeros(2, 3, 1), 1.0, torch.zeros(4, 1))


def test_minimise_log_finds_the_minimum_and_is_never_worse_than_one():
    value, best = minimise_log(lambda v: (math.log(v) - math.log(0.37)) ** 2)
    assert value == pytest.approx(0.37, rel=1e-4) and best < 1e-8
    flat_at_one = minimise_log(lambda v: 0.0 if v == 1.0 else 1.0)
    assert flat_at_one == (1.0, 0.0)
    with pytest.raises(InvalidArgumentError, match="0 < low < 1 < high"):
        minimise_log(lambda v: v, (2.0, 3.0))
