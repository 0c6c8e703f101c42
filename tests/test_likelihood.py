"""Tests of bnnify.bnn.likelihood: values against torch.distributions, shape and label checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from bnnify.bnn.likelihood import (
    CategoricalLikelihood,
    GaussianLikelihood,
    class_labels,
    classes_last,
)
from bnnify.errors import InputError


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_nll_is_the_negative_normal_log_density(dtype):
    likelihood = GaussianLikelihood(noise=0.4)
    output = torch.randn(6, 3, dtype=dtype)
    target = torch.randn(6, 3, dtype=dtype)
    nll = likelihood.nll(output, target)
    expected = -Normal(output.double(), 0.4).log_prob(target.double()).sum(1)
    assert nll.shape == (6,)
    assert nll.dtype == dtype
    assert torch.allclose(nll.double(), expected, atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_gaussian_nll_accepts_flat_targets_and_integer_ones():
    likelihood = GaussianLikelihood(noise=1.0)
    output = torch.randn(5, 1)
    flat = likelihood.nll(output, torch.arange(5))
    column = likelihood.nll(output, torch.arange(5.0).unsqueeze(1))
    assert torch.equal(flat, column)


def test_noise_is_exp_of_its_log_and_trains():
    likelihood = GaussianLikelihood(noise=2.0)
    assert float(likelihood.noise.detach()) == pytest.approx(2.0)
    assert [name for name, _ in likelihood.named_parameters()] == ["log_noise"]
    output, target = torch.zeros(4, 1), torch.ones(4, 1)
    likelihood.nll(output, target).mean().backward()
    # d/ds [0.5 (r / s)^2 + log s] at r = 1, s = 2 is -r^2/s^3 + 1/s; times ds/dlog s = s.
    assert float(likelihood.log_noise.grad) == pytest.approx(-1 / 4 + 1)


def test_the_optimal_noise_is_the_residual_rms():
    output, target = torch.randn(100, 2), torch.randn(100, 2)
    rms = float((output - target).square().mean().sqrt())
    likelihood = GaussianLikelihood(noise=rms)
    likelihood.nll(output, target).mean().backward()
    assert float(likelihood.log_noise.grad) == pytest.approx(0.0, abs=1e-5)


def test_gaussian_check_names_both_widths():
    likelihood = GaussianLikelihood()
    likelihood.check(torch.zeros(3, 2), torch.zeros(3, 2))
    likelihood.check(torch.zeros(3, 1), torch.zeros(3))
    with pytest.raises(InputError, match=r"gives 2 output\(s\) per example but the targets have 1"):
        likelihood.check(torch.zeros(3, 2), torch.zeros(3))


def test_categorical_nll_is_cross_entropy_of_the_logits():
    likelihood = CategoricalLikelihood()
    logits = torch.randn(7, 4)
    labels = torch.randint(0, 4, (7,))
    expected = -logits.log_softmax(-1)[torch.arange(7), labels]
    assert torch.allclose(likelihood.nll(logits, labels), expected, atol=1e-6)
    as_float = likelihood.nll(logits, labels.double())
    assert torch.equal(as_float, F.cross_entropy(logits, labels, reduction="none"))


def test_categorical_check_accepts_valid_labels():
    CategoricalLikelihood().check(torch.zeros(4, 3), torch.tensor([0, 1, 2, 2]))
    CategoricalLikelihood().check(torch.zeros(4, 3), torch.tensor([0.0, 1.0, 2.0, 2.0]))


@pytest.mark.parametrize(
    ("output", "target", "message"),
    [
        (torch.zeros(4, 3), torch.tensor([0, 1, 3, 2]), r"\[0, 2\] .* 3 outputs; found 0\.\.3"),
        (torch.zeros(4, 3), torch.tensor([-1, 1, 2, 2]), r"found -1\.\.2"),
        (torch.zeros(2, 3), torch.tensor([0.5, 1.0]), "must be class indices"),
        (torch.zeros(2), torch.tensor([0, 1]), r"shape \(batch, \.\.\., classes\).*\(2,\)"),
        (torch.zeros(2, 3, 2), torch.tensor([0, 1]), r"labels of shape \(2,\) do not match"),
        (torch.zeros(3, 2), torch.zeros(3, 2), r"labels of shape \(3, 2\) do not match"),
    ],
)
def test_categorical_check_refuses_bad_labels(output, target, message):
    with pytest.raises(InputError, match=message):
        CategoricalLikelihood().check(output, target)


def test_tasks_are_named():
    assert GaussianLikelihood.task == "regression"
    assert CategoricalLikelihood.task == "classification"
    assert math.isclose(float(GaussianLikelihood().noise.detach()), 1.0)


# ------------------------------------------- classes beyond (batch, classes)


def test_per_token_nll_sums_the_cross_entropy_of_every_position():
    logits = torch.randn(4, 5, 3)
    labels = torch.randint(0, 3, (4, 5))
    nll = CategoricalLikelihood().nll(logits, labels)
    expected = torch.zeros(4)
    for b in range(4):
        for t in range(5):
            expected[b] -= logits[b, t].log_softmax(0)[labels[b, t]]
    assert nll.shape == (4,)
    assert torch.allclose(nll, expected, atol=1e-5)


def test_a_class_dimension_other_than_the_last():
    logits = torch.randn(2, 3, 4, 5)  # (batch, classes, H, W), as segmentation models give
    labels = torch.randint(0, 3, (2, 4, 5))
    moved = classes_last(logits, class_dim=1)
    assert moved.shape == (2, 4, 5, 3) and torch.equal(moved[1, 2, 3], logits[1, :, 2, 3])
    assert classes_last(torch.zeros(7, 2, 3, 5), 1, leading=1).shape == (7, 2, 5, 3)
    by_dim = CategoricalLikelihood(class_dim=1)
    assert torch.allclose(by_dim.nll(logits, labels), CategoricalLikelihood().nll(moved, labels))
    by_dim.check(logits, labels)
    with pytest.raises(InputError, match="class dimension 0 is not"):
        classes_last(logits, 0)
    with pytest.raises(InputError, match="class dimension 4 is not") as error:
        classes_last(logits, 4)
    assert "between 1 and 3" in error.value.hint


def test_labels_with_a_unit_last_axis_are_squeezed_and_others_refused():
    logits = torch.randn(6, 3)
    labels = torch.randint(0, 3, (6,))
    likelihood = CategoricalLikelihood()
    assert torch.equal(likelihood.nll(logits, labels[:, None]), likelihood.nll(logits, labels))
    likelihood.check(logits, labels[:, None])
    assert class_labels(logits, labels[:, None]).shape == (6,)
    for bad in (labels[:3], labels.reshape(2, 3), torch.zeros(6, 2), labels[None]):
        with pytest.raises(InputError, match="do not match predictions of shape"):
            likelihood.check(logits, bad)
        with pytest.raises(InputError, match="do not match"):
            likelihood.nll(logits, bad)
    tokens = torch.randn(2, 4, 3)
    likelihood.check(tokens, torch.zeros(2, 4, 1))
    with pytest.raises(InputError, match=r"labels of shape \(2,\) do not match"):
        likelihood.check(tokens, torch.zeros(2))
