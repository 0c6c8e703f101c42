"""Tests of bnnify.bnn.metrics against values computed by hand or directly."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from bnnify.bnn.metrics import (
    classification_summary,
    expected_calibration_error,
    gaussian_mixture_log_likelihood,
    regression_summary,
)


def entropy(*p: float) -> float:
    return -sum(q * math.log(q) for q in p if q > 0)


def logits_of(*probs: list[float]) -> torch.Tensor:
    """Samples `(S, 1, classes)` whose softmax is each of `probs`."""
    return torch.tensor(probs, dtype=torch.float64).log().unsqueeze(1)


# ------------------------------------------------------------------------ ECE


def test_ece_hand_computed_with_points_on_bin_edges():
    # bins=4: edges 0, 0.25, 0.5, 0.75, 1, exact in binary; bins are (low, high].
    probs = torch.tensor(
        [
            [0.75, 0.25, 0.0],  # confidence 0.75, correct -> bin (0.5, 0.75]
            [0.25, 0.75, 0.0],  # confidence 0.75, wrong   -> bin (0.5, 0.75]
            [0.8, 0.2, 0.0],  # confidence 0.8, correct  -> bin (0.75, 1]
            [0.5, 0.3, 0.2],  # confidence 0.5, correct  -> bin (0.25, 0.5]
            [1.0, 0.0, 0.0],  # confidence 1.0, correct  -> bin (0.75, 1]
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 0, 0, 0, 0])
    n = 5
    expected = (
        2 / n * abs(1 / 2 - 0.75)  # (0.5, 0.75]: accuracy 1/2, confidence 0.75
        + 2 / n * abs(1.0 - (0.8 + 1.0) / 2)  # (0.75, 1]: accuracy 1, confidence 0.9
        + 1 / n * abs(1.0 - 0.5)  # (0.25, 0.5]: accuracy 1, confidence 0.5
    )
    assert expected == pytest.approx(0.24)
    # Counting 0.75 in the bin above would give 0.16, counting 0.5 in the bin above 0.04.
    assert expected_calibration_error(probs, labels, bins=4) == pytest.approx(expected, abs=1e-12)


def test_ece_docstring_example_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1])
    # bins=5: 0.9 in (0.8, 1] correct, 0.55 in (0.4, 0.6] wrong, 0.7 in (0.6, 0.8] correct.
    expected = (abs(1 - 0.9) + abs(0 - 0.55) + abs(1 - 0.7)) / 3
    assert expected_calibration_error(probs, labels, bins=5) == pytest.approx(expected)


def test_ece_lowest_bin_includes_its_lower_edge():
    # Four equal classes: confidence 0.25 = the first edge of bins=4 (and argmax is class 0).
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.9, 0.1, 0.0, 0.0]])
    labels = torch.tensor([0, 1])
    expected = 1 / 2 * abs(1 - 0.25) + 1 / 2 * abs(0 - 0.9)
    assert expected_calibration_error(probs, labels, bins=4) == pytest.approx(expected)


def test_ece_zero_when_calibrated_and_one_bin_is_the_global_gap():
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 0, 1]), bins=4) == pytest.approx(
        0.0, abs=1e-12
    )
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    labels = torch.tensor([1, 1, 0])  # wrong, right, right
    gap = abs(2 / 3 - (0.9 + 0.8 + 0.6) / 3)
    assert expected_calibration_error(probs, labels, bins=1) == pytest.approx(gap)


def test_ece_is_bounded_and_vanishes_for_certain_correct_predictions():
    probs = torch.randn(200, 5).softmax(-1)
    labels = torch.randint(0, 5, (200,))
    assert 0.0 <= expected_calibration_error(probs, labels) <= 1.0
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    assert expected_calibration_error(one_hot, labels) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------- classification summary


def test_two_disagreeing_samples_have_known_entropies():
    summary = classification_summary(logits_of([0.9, 0.1], [0.1, 0.9]))
    assert summary["probs"][0].tolist() == pytest.approx([0.5, 0.5])
    assert float(summary["predictive_entropy"][0]) == pytest.approx(math.log(2))
    assert float(summary["expected_entropy"][0]) == pytest.approx(entropy(0.9, 0.1))
    mutual = math.log(2) - entropy(0.9, 0.1)
    assert float(summary["mutual_information"][0]) == pytest.approx(mutual)


def test_two_samples_of_three_classes_by_hand():
    a, b = [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]
    summary = classification_summary(logits_of(a, b))
    mean = [(p + q) / 2 for p, q in zip(a, b, strict=True)]
    assert summary["probs"][0].tolist() == pytest.approx(mean)
    assert int(summary["predicted"][0]) == 0  # mean (0.4, 0.25, 0.35)
    assert float(summary["predictive_entropy"][0]) == pytest.approx(entropy(*mean))
    expected = (entropy(*a) + entropy(*b)) / 2
    assert float(summary["expected_entropy"][0]) == pytest.approx(expected)


def test_mutual_information_is_zero_when_all_samples_agree():
    logits = torch.randn(1, 6, 4).expand(5, 6, 4)
    summary = classification_summary(logits)
    assert torch.allclose(summary["mutual_information"], torch.zeros(6).double(), atol=1e-12)
    single = logits[0].double().softmax(-1)
    assert torch.allclose(summary["probs"], single)
    assert torch.allclose(
        summary["predictive_entropy"], -(single * single.log()).sum(-1), atol=1e-12
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_predictive_entropy_is_expected_entropy_plus_mutual_information(dtype):
    logits = (3 * torch.randn(8, 10, 5)).to(dtype)
    summary = classification_summary(logits)
    total = summary["expected_entropy"] + summary["mutual_information"]
    assert torch.allclose(summary["predictive_entropy"], total, atol=1e-10)
    assert (summary["mutual_information"] > 0).all()  # the samples disagree
    assert torch.allclose(summary["probs"].sum(-1), torch.ones(10, dtype=torch.float64))
    assert torch.equal(summary["predicted"], summary["probs"].argmax(-1))
    assert (summary["predictive_entropy"] <= math.log(5) + 1e-12).all()


# ------------------------------------------------------------------ regression


def test_mixture_log_likelihood_matches_direct_computation():
    samples = torch.randn(3, 4, 2, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    noise = 0.7
    direct = []
    for i in range(4):
        density = 0.0
        for s in range(3):
            log_p = Normal(samples[s, i], noise).log_prob(y[i]).sum()
            density += math.exp(float(log_p)) / 3
        direct.append(math.log(density))
    result = gaussian_mixture_log_likelihood(samples, noise, y)
    assert result.shape == (4,)
    assert result.tolist() == pytest.approx(direct, rel=1e-12)


def test_mixture_of_one_sample_is_the_gaussian_and_stable_far_away():
    samples = torch.randn(1, 5, 1)
    y = torch.randn(5)
    result = gaussian_mixture_log_likelihood(samples, torch.tensor(0.3), y)
    expected = Normal(samples[0, :, 0].double(), 0.3).log_prob(y.double())
    assert torch.allclose(result, expected, atol=1e-6)
    # 100 noise scales away the density underflows, its logarithm must not.
    far = gaussian_mixture_log_likelihood(torch.zeros(2, 1, 1), 0.01, torch.ones(1))
    assert torch.isfinite(far).all()
    assert float(far) == pytest.approx(-0.5 * 100**2 - math.log(0.01) - 0.5 * math.log(2 * math.pi))


def test_regression_summary_decomposes_the_predictive_variance():
    samples = torch.randn(50, 7, 2, dtype=torch.float64)
    noise = 0.3
    summary = regression_summary(samples, noise)
    assert torch.allclose(summary["mean"], samples.mean(0))
    centred = samples - samples.mean(0)
    assert torch.allclose(summary["epistemic_std"] ** 2, centred.square().mean(0))
    assert torch.allclose(summary["aleatoric_std"], torch.full((7, 2), noise, dtype=torch.float64))
    total = summary["epistemic_std"] ** 2 + summary["aleatoric_std"] ** 2
    assert torch.allclose(summary["std"] ** 2, total)
    # The variance of the mixture of N(f_s, noise^2): E[f^2] + noise^2 - E[f]^2.
    mixture = samples.square().mean(0) + noise**2 - samples.mean(0).square()
    assert torch.allclose(summary["std"] ** 2, mixture)


def test_regression_summary_of_one_sample_is_the_noise_only():
    samples = torch.randn(1, 4, 1)
    summary = regression_summary(samples, torch.tensor(0.25))
    assert torch.equal(summary["epistemic_std"], torch.zeros(4, 1))
    assert torch.allclose(summary["std"], torch.full((4, 1), 0.25))
    assert torch.equal(summary["mean"], samples[0])
