"""Tests of bnnify.bnn.metrics against values computed by hand or directly."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from bnnify.bnn.metrics import (
    CALIBRATION_LEVELS,
    auroc,
    average_precision,
    classification_scores,
    classification_summary,
    expected_calibration_error,
    gaussian_mixture_log_likelihood,
    interval_coverage,
    ood_detection,
    quantile_calibration_error,
    regression_scores,
    regression_summary,
    reliability_bins,
)
from bnnify.bnn.mixture import gaussian_mixture_cdf
from bnnify.errors import InputError, InvalidArgumentError


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


def test_mixture_log_likelihood_takes_a_scale_per_example():
    samples, y = torch.randn(3, 4, 1, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    noise = torch.rand(1, 4, 1, dtype=torch.float64) + 0.1
    result = gaussian_mixture_log_likelihood(samples, noise, y)
    for i in range(4):
        one = gaussian_mixture_log_likelihood(
            samples[:, i : i + 1], float(noise[0, i]), y[i : i + 1]
        )
        assert float(result[i]) == pytest.approx(float(one), rel=1e-12)


# ---------------------------------------------------------- regression scores


def normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def normal_pdf(z: float) -> float:
    return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def draw_from_mixtures(samples: torch.Tensor, noise: float) -> torch.Tensor:
    """One target per example, drawn from that example's mixture (1/S) sum_s N(f_s, noise^2)."""
    pick = torch.randint(0, samples.shape[0], (samples.shape[1],))
    return samples[pick, torch.arange(samples.shape[1])] + noise * torch.randn(samples.shape[1])


def test_regression_scores_of_a_hand_computed_set():
    # Two examples, two samples each, noise 1.
    #   example 1: f = (-1, 1), y = -0.2: mean 0, error 0.2,
    #              F(y) = (Phi(0.8) + Phi(-1.2)) / 2 = (0.78814 + 0.11507) / 2 = 0.45161
    #   example 2: f = (0, 0),  y = 3:    mean 0, error 3, F(y) = Phi(3) = 0.99865
    samples = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([-0.2, 3.0], dtype=torch.float64)
    scores = regression_scores(samples, 1.0, y)
    assert scores["rmse"] == pytest.approx(math.sqrt((0.2**2 + 3**2) / 2), rel=1e-12)
    assert scores["mae"] == pytest.approx((0.2 + 3) / 2, rel=1e-12)
    density_1 = (normal_pdf(0.8) + normal_pdf(1.2)) / 2
    nll = -(math.log(density_1) + math.log(normal_pdf(3))) / 2
    assert scores["nll"] == pytest.approx(nll, rel=1e-12)
    # |F - 1/2| = 0.048 (inside every central interval) and 0.499 (outside even the 95%).
    for level in (50, 90, 95):
        assert scores[f"coverage_{level}"] == 0.5
    # P(F <= p): 0 for p = 0.05..0.45 (9 levels, |0 - p| sums to 2.25), 1/2 for
    # p = 0.5..0.95 (10 levels, |1/2 - p| sums to 2.25): (2.25 + 2.25) / 19.
    assert scores["calibration_error"] == pytest.approx(4.5 / 19, rel=1e-12)
    # CRPS of example 2 is that of N(0, 1) at 3: 3 (2 Phi(3) - 1) + 2 phi(3) - 1/sqrt(pi).
    crps_2 = 3 * (2 * normal_cdf(3) - 1) + 2 * normal_pdf(3) - 1 / math.sqrt(math.pi)

    # Example 1: E|X - y| over both components, minus half E|X - X'| over the four pairs.
    def abs_moment(m, s):
        return m * (2 * normal_cdf(m / s) - 1) + 2 * s * normal_pdf(m / s)

    spread = (2 * abs_moment(0, math.sqrt(2)) + 2 * abs_moment(2, math.sqrt(2))) / 4
    crps_1 = (abs_moment(-0.2 + 1, 1) + abs_moment(-0.2 - 1, 1)) / 2 - spread / 2
    assert scores["crps"] == pytest.approx((crps_1 + crps_2) / 2, rel=1e-12)
    # Width of the 95% interval of example 2 is 2 z_0.975; of example 1 (symmetric about 0)
    # 2 q with (Phi(q - 1) + Phi(q + 1)) / 2 = 0.975, found here by plain bisection.
    low, high = 0.0, 10.0
    for _ in range(100):
        mid = (low + high) / 2
        if (normal_cdf(mid - 1) + normal_cdf(mid + 1)) / 2 < 0.975:
            low = mid
        else:
            high = mid
    width = (2 * low + 2 * 1.959963984540054) / 2
    assert scores["width_95"] == pytest.approx(width, rel=1e-10)


def test_regression_scores_of_a_calibrated_set_are_nominal():
    # Targets drawn from the predictive itself: F(y) is uniform, so each coverage has
    # standard error sqrt(c (1 - c) / n) <= 0.0025 at n = 40,000; tolerance 0.01 (4 SE),
    # and calibration error (a mean of 19 such absolute errors) below 0.01.
    samples, noise = torch.randn(4, 40_000, dtype=torch.float64), 1.0
    y = draw_from_mixtures(samples, noise)
    pit = gaussian_mixture_cdf(samples, noise, y)
    coverage = interval_coverage(pit, [0.5, 0.9, 0.95])
    assert coverage.tolist() == pytest.approx([0.5, 0.9, 0.95], abs=0.01)
    assert quantile_calibration_error(pit) < 0.01
    # regression_scores on the first 4,000 (SE <= 0.008): nominal within 0.03, and the
    # same targets under a narrower noise give an over-confident predictive, visibly so.
    scores = regression_scores(samples[:, :4000], noise, y[:4000])
    for level in (50, 90, 95):
        assert scores[f"coverage_{level}"] == pytest.approx(level / 100, abs=0.03)
    assert scores["calibration_error"] < 0.02
    narrow = regression_scores(samples[:, :4000], noise / 2, y[:4000])
    assert narrow["coverage_90"] < 0.8
    assert narrow["calibration_error"] > 0.04
    assert narrow["width_90"] < scores["width_90"]
    assert narrow["crps"] > scores["crps"] and narrow["nll"] > scores["nll"]
    assert narrow["rmse"] == scores["rmse"]  # the same mean, computed the same way


def test_calibration_error_sees_a_bias_that_central_intervals_miss():
    # Predictive N(0, 1), targets -|z| with z ~ N(0, 1): |F(y) - 1/2| = Phi(|z|) - 1/2 has
    # the right law (every central interval covers c), but F(y) <= 1/2 always:
    # P(F <= p) = 2p for p <= 1/2 and 1 above, so |P - p| = p, then 1 - p; summed over
    # the 19 levels: (0.05 + ... + 0.5) + (0.45 + ... + 0.05) = 2.75 + 2.25 = 5; mean 5/19.
    n = 40_000
    y = -torch.randn(n, dtype=torch.float64).abs()
    pit = gaussian_mixture_cdf(torch.zeros(1, n, dtype=torch.float64), 1.0, y)
    assert interval_coverage(pit, [0.5, 0.9]).tolist() == pytest.approx([0.5, 0.9], abs=0.01)
    assert quantile_calibration_error(pit) == pytest.approx(5 / 19, abs=0.01)


def test_interval_coverage_counts_the_central_intervals_by_hand():
    pit = torch.tensor([0.5, 0.3, 0.05, 0.99, 0.74])
    # |F - 1/2| = 0, 0.2, 0.45, 0.49, 0.24: within 0.25 (50%): 3; within 0.45 (90%): 4.
    assert interval_coverage(pit, [0.5, 0.9]).tolist() == pytest.approx([3 / 5, 4 / 5])
    assert quantile_calibration_error(pit, [0.5]) == pytest.approx(abs(3 / 5 - 0.5))
    assert len(CALIBRATION_LEVELS) == 19 and CALIBRATION_LEVELS[9] == 0.5


def test_regression_scores_of_a_single_gaussian_and_of_several_outputs():
    mean, std = torch.randn(6, 2, dtype=torch.float64), torch.rand(6, 2, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    scores = regression_scores(mean[None], std[None] + 0.1, y)
    z = (y - mean) / (std + 0.1)
    nll = -Normal(mean, std + 0.1).log_prob(y).sum(1).mean()  # outputs summed per example
    assert scores["nll"] == pytest.approx(float(nll), rel=1e-12)
    assert scores["coverage_50"] == pytest.approx(
        float((z.abs() <= 0.6744897501960817).double().mean())
    )
    with pytest.raises(InputError, match="targets"):
        regression_scores(mean[None], 1.0, y[:, :1])
    with pytest.raises(InvalidArgumentError, match="positive"):
        regression_scores(mean[None], 0.0, y)


# ------------------------------------------------------ classification scores


def test_classification_scores_of_a_hand_computed_set():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.45, 0.25], [0.1, 0.15, 0.75]])
    labels = torch.tensor([0, 2, 2])
    scores = classification_scores(probs, labels, bins=5)
    # Predicted 0, 1, 2: two right.
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.25) + math.log(0.75)) / 3)
    # Brier: 0.3^2 + 0.2^2 + 0.1^2 = 0.14; 0.3^2 + 0.45^2 + 0.75^2 = 0.855;
    # 0.1^2 + 0.15^2 + 0.25^2 = 0.095; mean 1.09 / 3.
    assert scores["brier"] == pytest.approx(1.09 / 3, rel=1e-6)
    # bins=5: 0.7 and 0.75 (right) share (0.6, 0.8], 0.45 (wrong) is in (0.4, 0.6]:
    # 2/3 |1 - 0.725| + 1/3 |0 - 0.45| = 0.18333 + 0.15.
    assert scores["ece"] == pytest.approx(2 / 3 * 0.275 + 0.45 / 3, rel=1e-6)
    assert scores["ece_bins"] == 5


def test_classification_scores_of_a_calibrated_set():
    # Labels drawn from the predicted probabilities: E[Brier] = E[1 - sum p^2],
    # E[NLL] = E[entropy], E[accuracy] = E[max p], and ECE -> 0. With n = 40,000, each
    # mean has a standard error below 0.005; tolerances 0.02 (ECE: a positive bias of
    # about sqrt(2 / (pi n_b)) per bin, below 0.01 here).
    probs = (2 * torch.randn(40_000, 4)).softmax(-1).double()
    labels = torch.multinomial(probs, 1).squeeze(1)
    scores = classification_scores(probs, labels)
    assert scores["brier"] == pytest.approx(float((1 - probs.square().sum(1)).mean()), abs=0.01)
    entropy = float(-(probs * probs.log()).sum(1).mean())
    assert scores["nll"] == pytest.approx(entropy, abs=0.02)
    assert scores["accuracy"] == pytest.approx(float(probs.max(1).values.mean()), abs=0.01)
    assert scores["ece"] < 0.02
    # The same labels under sharpened probabilities: over-confident.
    sharp = (3 * probs.log()).softmax(-1)
    assert classification_scores(sharp, labels)["ece"] > 0.1


def test_classification_scores_take_any_leading_shape_and_squeeze_a_unit_label_axis():
    probs = torch.randn(3, 5, 4).softmax(-1)
    labels = torch.randint(0, 4, (3, 5))
    flat = classification_scores(probs.reshape(15, 4), labels.reshape(15))
    for name, value in classification_scores(probs, labels).items():
        assert value == pytest.approx(flat[name], rel=1e-12)
    for name, value in classification_scores(probs, labels[..., None]).items():
        assert value == pytest.approx(flat[name], rel=1e-12)
    # Labels (n, 1) against predictions (n,) broadcast to (n, n) before; now they match.
    probs, labels = probs[0], labels[0]
    ece = expected_calibration_error(probs, labels)
    assert expected_calibration_error(probs, labels[:, None]) == pytest.approx(ece)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.zeros(1, 5, dtype=torch.long), r"labels of shape \(1, 5\)"),
        (torch.zeros(5, 2, dtype=torch.long), r"labels of shape \(5, 2\)"),
        (torch.zeros(4, dtype=torch.long), r"labels of shape \(4,\)"),
        (torch.tensor([0, 1, 2, 3, 4]), r"\[0, 3\] .*; found 0..4"),
        (torch.tensor([0, 1, 0.5, 1, 0]), "integers"),
    ],
)
def test_labels_that_do_not_fit_are_refused(labels, message):
    probs = torch.full((5, 4), 0.25)
    with pytest.raises(InputError, match=message):
        classification_scores(probs, labels)
    with pytest.raises(InputError, match=message):
        reliability_bins(probs, labels)


def test_reliability_bins_hold_every_example_and_give_the_ece():
    probs = torch.randn(300, 3).softmax(-1)
    labels = torch.randint(0, 3, (300,))
    table = reliability_bins(probs, labels, bins=10)
    assert int(table["counts"].sum()) == 300
    confidence = probs.max(1).values.double()
    for b in range(10):
        low, high = table["edges"][b], table["edges"][b + 1]
        inside = (confidence > low) & (confidence <= high)
        assert int(table["counts"][b]) == int(inside.sum())
        if inside.any():
            assert float(table["confidence"][b]) == pytest.approx(float(confidence[inside].mean()))
    weights = table["counts"].double() / 300
    ece = float((weights * (table["accuracy"] - table["confidence"]).abs()).sum())
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(ece, rel=1e-12)


# ------------------------------------------------------------- OOD detection


def brute_force_auroc(scores: list[float], positive: list[bool]) -> float:
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def brute_force_average_precision(scores: list[float], positive: list[bool]) -> float:
    total, area, recall = sum(positive), 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        chosen = [p for s, p in zip(scores, positive, strict=True) if s >= threshold]
        new_recall = sum(chosen) / total
        area += (new_recall - recall) * sum(chosen) / len(chosen)
        recall = new_recall
    return area


@pytest.mark.parametrize("values", [3, 1000])
def test_auroc_and_average_precision_match_brute_force_with_ties(values):
    scores = torch.randint(0, values, (60,)).double()
    positive = torch.rand(60) < 0.4
    expected = brute_force_auroc(scores.tolist(), positive.tolist())
    assert auroc(scores, positive) == pytest.approx(expected, rel=1e-12)
    expected = brute_force_average_precision(scores.tolist(), positive.tolist())
    assert average_precision(scores, positive) == pytest.approx(expected, rel=1e-12)


def test_detection_metrics_by_hand():
    positive = torch.tensor([True, False, True, False, False])
    separated = torch.tensor([0.9, 0.5, 0.8, 0.1, 0.2])
    assert auroc(separated, positive) == 1.0
    assert average_precision(separated, positive) == 1.0
    assert auroc(-separated, positive) == 0.0
    # All tied: one threshold, precision = prevalence 2/5, AUROC one half.
    tied = torch.zeros(5)
    assert auroc(tied, positive) == 0.5
    assert average_precision(tied, positive) == pytest.approx(2 / 5)
    # 0.9 (+), 0.8 (-), 0.4 (+): AUROC 5/6 (0.4 beats 0.3 and 0.1 only); AP = 1/2 * 1 + 1/2 * 2/3.
    scores = torch.tensor([0.9, 0.8, 0.4, 0.3, 0.1])
    positive = torch.tensor([True, False, True, False, False])
    assert auroc(scores, positive) == pytest.approx(5 / 6)
    assert average_precision(scores, positive) == pytest.approx(5 / 6)
    with pytest.raises(InvalidArgumentError, match="both classes"):
        auroc(scores, torch.ones(5))


def test_ood_detection_orients_every_score_toward_the_ood_inputs():
    # In distribution: every sample agrees on a confident answer. Out of distribution:
    # the samples disagree (mutual information > 0) and their mean is flat.
    inside = torch.tensor([6.0, 0.0, 0.0]).expand(4, 30, 3) + 0.1 * torch.randn(1, 30, 3)
    outside = 4 * torch.randn(4, 20, 3)
    results = ood_detection(inside, outside)
    assert set(results) == {"predictive_entropy", "mutual_information", "max_softmax"}
    for name, result in results.items():
        assert result["auroc"] == 1.0, name
        assert result["aupr"] == 1.0, name
    # Swapping the roles turns every score around.
    for result in ood_detection(outside, inside).values():
        assert result["auroc"] == 0.0


def test_max_softmax_ranks_confidences_that_round_to_one():
    # 1 - p is below the float64 spacing at 1 for both: -max p would tie them all.
    inside = torch.tensor([[[60.0, 0.0], [58.0, 0.0]]])
    outside = torch.tensor([[[45.0, 0.0], [44.0, 0.0]]])
    assert classification_summary(outside)["probs"].amax(-1).eq(1.0).all()
    scores = ood_detection(inside, outside)["max_softmax"]
    assert scores == {"auroc": 1.0, "aupr": 1.0}
