"""Tests of bnnify.bnn.prune: signal-to-noise ranking, and a pruned weight is a point at 0."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

from bnnify.bnn import BayesianModule
from bnnify.bnn.prune import (
    prune_gaussian,
    pruned_rho,
    pruned_sigma,
    pruning_masks,
    signal_to_noise,
)
from bnnify.errors import InvalidArgumentError
from bnnify.formats.checkpoint_checks import check_spread


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_a_pruned_spread_is_the_smallest_normal_number_of_its_dtype_times_e2(dtype):
    rho = torch.tensor(pruned_rho(dtype), dtype=dtype)
    sigma = F.softplus(rho)
    tiny = torch.finfo(dtype).tiny
    assert tiny < float(sigma) < 10 * tiny
    assert float(sigma) == pruned_sigma(dtype)
    check_spread(rho.reshape(1), "w.rho", "test")  # a checkpoint reader accepts it


def test_signal_to_noise_is_abs_mean_over_stddev_without_overflow():
    mu = torch.tensor([1e3, -2.0, 0.0])
    sigma = torch.tensor([pruned_sigma(torch.float32), 4.0, 1.0])
    snr = signal_to_noise(Normal(mu, sigma))
    assert snr.dtype == torch.float64
    assert torch.isfinite(snr).all()  # 1e3 / 8.7e-38 overflows float32
    assert snr[1:].tolist() == [0.5, 0.0]


@pytest.mark.parametrize("keep", [0.0, 0.05, 0.3, 0.5, 1.0])
def test_keep_leaves_that_fraction_with_the_highest_ratios(keep):
    generator = torch.Generator().manual_seed(0)
    snr = {"a": torch.rand(7, 3, generator=generator), "b": torch.rand(40, generator=generator)}
    masks = pruning_masks(snr, keep=keep)
    total = 61
    kept = {n: snr[n][~masks[n]] for n in snr}
    assert sum(k.numel() for k in kept.values()) == math.floor(keep * total + 0.5)  # half up
    pruned = torch.cat([snr[n][masks[n]] for n in snr])
    survivors = torch.cat(list(kept.values()))
    if pruned.numel() and survivors.numel():
        assert pruned.max() <= survivors.min()
    assert masks["a"].shape == (7, 3)


def test_ties_are_pruned_in_order_of_the_parameters_then_elements():
    snr = {"a": torch.zeros(3), "b": torch.zeros(2)}
    masks = pruning_masks(snr, keep=0.4)
    assert masks["a"].tolist() == [True, True, True]
    assert masks["b"].tolist() == [False, False]


def test_groups_rank_each_layer_apart():
    snr = {"l1.weight": torch.tensor([10.0, 20.0]), "l2.weight": torch.tensor([0.1, 0.2])}
    groups = {"l1.weight": "l1", "l2.weight": "l2"}
    local = pruning_masks(snr, keep=0.5, groups=groups)
    assert local["l1.weight"].tolist() == [True, False]
    assert local["l2.weight"].tolist() == [True, False]
    overall = pruning_masks(snr, keep=0.5)
    assert overall["l2.weight"].all() and not overall["l1.weight"].any()


def test_threshold_prunes_every_ratio_below_it():
    masks = pruning_masks({"w": torch.tensor([0.5, 1.0, 2.0])}, threshold=1.0)
    assert masks["w"].tolist() == [True, False, False]


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "exactly one"),
        ({"keep": 0.5, "threshold": 1.0}, "exactly one"),
        ({"keep": 1.5}, "in \\[0, 1\\]"),
        ({"keep": -0.1}, "in \\[0, 1\\]"),
        ({"threshold": -1.0}, ">= 0"),
        ({"threshold": float("nan")}, ">= 0"),
        ({"threshold": float("inf")}, ">= 0"),
    ],
)
def test_invalid_choices_are_refused(options, message):
    with pytest.raises(InvalidArgumentError, match=message):
        pruning_masks({"w": torch.ones(2)}, **options)


def test_a_pruned_weight_samples_as_zero_and_its_kl_is_finite():
    for prior in ("gaussian", "laplace", "scale_mixture"):
        bnn = BayesianModule(nn.Sequential(nn.Linear(5, 4)), prior=prior)
        state = bnn.variational_state()
        mask = torch.zeros(4, 5, dtype=torch.bool)
        mask[:, :3] = True
        mu, rho = prune_gaussian(state["0.weight.mu"], state["0.weight.rho"], mask)
        bnn.load_variational_state({"0.weight.mu": mu, "0.weight.rho": rho}, strict=False)
        draws = torch.stack([bnn.sample_parameters()["0.weight"] for _ in range(200)])
        assert draws[:, mask].abs().max() < 1e-36
        assert draws[:, ~mask].abs().min() > 0
        samples = 64 if prior == "scale_mixture" else None
        kl = bnn.kl_divergence(approx_num_samples=samples)
        assert torch.isfinite(kl) and kl > 0
