"""Tests of bnnify.bnn.mixture against direct sums, integrals and Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from bnnify.bnn import mixture
from bnnify.bnn.mixture import (
    gaussian_mixture_cdf,
    gaussian_mixture_crps,
    gaussian_mixture_quantile,
)
from bnnify.errors import InputError, InvalidArgumentError

Z_975 = 1.959963984540054  # the standard normal's 97.5% quantile


def mixture_cdf(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """F(x) of (1/S) sum_s N(loc_s, scale_s^2) at each x, from torch.distributions."""
    return Normal(loc.double()[:, None], scale.double()[:, None]).cdf(x.double()).mean(0)


def crps_by_integration(loc, scale, y: float, points: int = 200_001) -> float:
    """CRPS = int (F(x) - [x >= y])^2 dx, by the trapezoid rule on each side of y."""
    loc, scale = torch.as_tensor(loc).double(), torch.as_tensor(scale).double()
    reach = 12 * float(scale.max()) + float((loc - y).abs().max())
    left = torch.linspace(y - reach, y, points, dtype=torch.float64)
    right = torch.linspace(y, y + reach, points, dtype=torch.float64)
    below = torch.trapezoid(mixture_cdf(left, loc, scale).square(), left)
    above = torch.trapezoid((1 - mixture_cdf(right, loc, scale)).square(), right)
    return float(below + above)


# ------------------------------------------------------------------------ CDF


def test_cdf_is_the_mean_of_the_component_cdfs_with_any_scale_layout():
    samples = torch.randn(3, 4, 2, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    per_example = torch.rand(1, 4, 1, dtype=torch.float64) + 0.2
    for noise in (0.7, torch.tensor(0.7), per_example, per_example.expand(3, 4, 2) * 1.5):
        scale = torch.as_tensor(noise, dtype=torch.float64).expand(3, 4, 2)
        expected = torch.stack(
            [
                mixture_cdf(y[i, d].reshape(1), samples[:, i, d], scale[:, i, d])[0]
                for i in range(4)
                for d in range(2)
            ]
        ).reshape(4, 2)
        result = gaussian_mixture_cdf(samples, noise, y)
        assert result.shape == (4, 2)
        assert torch.allclose(result, expected, rtol=0, atol=1e-14)


def test_cdf_of_one_component_is_the_gaussian_and_targets_may_drop_a_unit_axis():
    mean, std, y = torch.randn(5, 1), torch.rand(5, 1) + 0.1, torch.randn(5)
    result = gaussian_mixture_cdf(mean[None], std[None], y)
    expected = Normal(mean.double(), std.double()).cdf(y.double()[:, None])
    assert torch.allclose(result, expected, rtol=0, atol=1e-14)


# ------------------------------------------------------------------ quantiles


def test_quantiles_of_one_gaussian_by_hand():
    # N(1, 2^2): q_0.5 = 1, q_0.975 = 1 + 2 z_0.975, q_0.025 = 1 - 2 z_0.975.
    q = gaussian_mixture_quantile(torch.ones(1, 1), 2.0, [0.025, 0.5, 0.975])
    assert q.shape == (3, 1)
    assert q.flatten().tolist() == pytest.approx([1 - 2 * Z_975, 1, 1 + 2 * Z_975], abs=1e-11)


def test_quantiles_of_two_component_mixtures_by_hand():
    # (N(-100, 1) + N(100, 1)) / 2: F(-100) = 1/2 Phi(0) + 1/2 Phi(-200) = 1/4 up to 1e-8000,
    # F(100) = 3/4 likewise; Newton's steps leave the bracket where the density is flat.
    q = gaussian_mixture_quantile(torch.tensor([[-100.0], [100.0]]), 1.0, [0.25, 0.75])
    assert q.flatten().tolist() == pytest.approx([-100, 100], abs=1e-9)
    # (N(-3, 1) + N(3, 1)) / 2 is symmetric about 0, its median. (Between two components
    # 200 apart, F is 1/2 to the last bit over most of the gap: any point there is a median.)
    q = gaussian_mixture_quantile(torch.tensor([[-3.0], [3.0]]), 1.0, [0.5])
    assert float(q) == pytest.approx(0, abs=1e-9)


def test_quantiles_invert_the_cdf_of_random_mixtures():
    samples = 3 * torch.randn(7, 50, dtype=torch.float64)
    noise = torch.rand(7, 50, dtype=torch.float64) + 0.05
    levels = torch.tensor([0.001, 0.05, 0.3, 0.5, 0.8, 0.95, 0.999], dtype=torch.float64)
    q = gaussian_mixture_quantile(samples, noise, levels)
    for i in range(50):
        reached = mixture_cdf(q[:, i], samples[:, i], noise[:, i])
        assert torch.allclose(reached, levels, rtol=0, atol=1e-12)


def test_quantiles_are_the_ends_of_the_intervals_that_the_cdf_counts():
    # y in [q_(1-c)/2, q_(1+c)/2] iff |F(y) - 1/2| <= c/2: the two routes agree on every target.
    samples, y = torch.randn(5, 400), 1.5 * torch.randn(400)
    q = gaussian_mixture_quantile(samples, 0.6, [0.05, 0.95])
    inside = (q[0] <= y) & (y <= q[1])
    pit = gaussian_mixture_cdf(samples, 0.6, y)
    assert torch.equal(inside, (pit - 0.5).abs() <= 0.45)
    assert 0 < int(inside.sum()) < 400


# ----------------------------------------------------------------------- CRPS


@pytest.mark.parametrize(("mean", "std", "y"), [(0.0, 1.0, 0.0), (1.0, 0.5, 2.3), (-3, 4, 1)])
def test_crps_of_a_gaussian_matches_numerical_integration(mean, std, y):
    one = torch.tensor([[mean]], dtype=torch.float64)
    result = gaussian_mixture_crps(one, std, torch.tensor([y], dtype=torch.float64))
    assert float(result) == pytest.approx(crps_by_integration([mean], [std], y), abs=1e-8)
    # Closed form (Gneiting & Raftery 2007): s (z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi)).
    z = (y - mean) / std
    phi = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    closed = std * (z * math.erf(z / math.sqrt(2)) + 2 * phi - 1 / math.sqrt(math.pi))
    assert float(result) == pytest.approx(closed, rel=1e-12)


def test_crps_of_a_mixture_matches_numerical_integration():
    loc = torch.tensor([-2.0, 0.5, 0.7, 3.0], dtype=torch.float64)
    scale = torch.tensor([0.5, 1.0, 0.2, 2.0], dtype=torch.float64)
    for y in (-3.0, 0.6, 5.0):
        result = gaussian_mixture_crps(loc[:, None], scale[:, None], torch.tensor([y]))
        assert float(result) == pytest.approx(crps_by_integration(loc, scale, y), abs=1e-8)


def test_crps_of_a_mixture_matches_monte_carlo():
    # CRPS = E|X - y| - E|X - X'| / 2 with X, X' independent draws of the mixture. With
    # n = 400,000 draws the estimate's standard error (from the draws) is about 0.003;
    # the tolerance is 5 standard errors.
    loc = torch.tensor([-1.0, 0.0, 2.5], dtype=torch.float64)
    noise, y, n = 0.8, 1.0, 400_000
    pick = torch.randint(0, 3, (2, n))
    x = loc[pick] + noise * torch.randn(2, n, dtype=torch.float64)
    terms = (x[0] - y).abs() - 0.5 * (x[0] - x[1]).abs()
    estimate, error = float(terms.mean()), float(terms.std() / math.sqrt(n))
    result = float(gaussian_mixture_crps(loc[:, None], noise, torch.tensor([y])))
    assert abs(result - estimate) < 5 * error
    assert error < 0.005


def test_crps_is_smaller_for_the_sharper_right_forecast_and_scales_with_y():
    y = torch.zeros(1)
    assert gaussian_mixture_crps(torch.zeros(1, 1), 0.1, y) < gaussian_mixture_crps(
        torch.zeros(1, 1), 1.0, y
    )
    samples, noise, y = torch.randn(4, 6, dtype=torch.float64), 0.3, torch.randn(6).double()
    scaled = gaussian_mixture_crps(10 * samples, 10 * noise, 10 * y)
    assert torch.allclose(scaled, 10 * gaussian_mixture_crps(samples, noise, y), rtol=1e-12)


# ---------------------------------------------------- chunks, threads, errors


def test_chunks_and_threads_do_not_change_the_results(monkeypatch):
    samples, noise = torch.randn(6, 40, 2, dtype=torch.float64), 0.4
    y = torch.randn(40, 2, dtype=torch.float64)
    levels = [0.1, 0.5, 0.9]

    def run():
        return (
            gaussian_mixture_cdf(samples, noise, y),
            gaussian_mixture_quantile(samples, noise, levels),
            gaussian_mixture_crps(samples, noise, y),
        )

    whole = run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr(mixture, "_CHUNK", 100)  # a few columns per chunk
        for part, full in zip(run(), whole, strict=True):
            assert torch.allclose(part, full, rtol=1e-12, atol=1e-14)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("noise", [0.0, -1.0, float("nan"), torch.tensor([[1.0], [0.0], [1.0]])])
def test_a_scale_that_is_not_positive_is_refused(noise):
    with pytest.raises(InvalidArgumentError, match="positive"):
        gaussian_mixture_cdf(torch.zeros(3, 2), noise, torch.zeros(2))


def test_shapes_that_do_not_fit_are_refused():
    with pytest.raises(InvalidArgumentError, match="does not broadcast"):
        gaussian_mixture_crps(torch.zeros(3, 2), torch.ones(4), torch.zeros(2))
    with pytest.raises(InputError, match=r"targets of shape \(3,\)"):
        gaussian_mixture_cdf(torch.zeros(3, 2), 1.0, torch.zeros(3))
    with pytest.raises(InputError, match=r"targets of shape \(2, 2\)"):
        gaussian_mixture_crps(torch.zeros(3, 2, 1), 1.0, torch.zeros(2, 2))
    with pytest.raises(InputError, match="samples, examples"):
        gaussian_mixture_cdf(torch.zeros(3), 1.0, torch.zeros(3))
    with pytest.raises(InvalidArgumentError, match=r"\(0, 1\)"):
        gaussian_mixture_quantile(torch.zeros(3, 2), 1.0, [0.5, 1.0])
