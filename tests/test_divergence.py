"""Segment planning of the KL divergence and its argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnnify.bnn as bnn
from bnnify.bnn.divergence import check_reduction, check_samples
from bnnify.errors import InvalidArgumentError


def _model(**kwargs):
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    return bnn.BayesianModule(net, **kwargs)


def test_equal_scalar_priors_merge_into_one_segment():
    model = _model()
    segments = model._divergence.segments[0]
    assert len(segments) == 1
    assert (segments[0].start, segments[0].end) == (0, model.num_variational_elements)
    assert segments[0].gaussian == (0.0, 1.0)


def test_tensor_priors_stay_one_segment_per_parameter():
    model = _model(prior="empirical_gaussian")
    assert len(model._divergence.segments[0]) == len(model.reparametrized_names())
    assert all(s.gaussian is None for s in model._divergence.segments[0])


def test_the_per_parameter_report_sums_to_the_merged_training_total():
    model = _model(prior=("gaussian", {"sigma": 0.3}))
    per = model._divergence.report(None)
    merged = model._divergence.terms(None, torch.device("cpu"))
    assert set(per) == set(model.reparametrized_names())
    total = sum(v for v in merged.values())
    # Two code paths: float64 report terms vs float32 training sums, to float32 rounding.
    torch.testing.assert_close(sum(per.values()), total.detach(), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("value", ["sum", "SUM", "Mean"])
def test_reductions_are_case_insensitive(value):
    assert check_reduction(value) == value.lower()


@pytest.mark.parametrize("value", ["max", None, 1])
def test_bad_reductions_list_the_choices(value):
    with pytest.raises(ValueError, match="'sum' or 'mean'"):
        check_reduction(value)


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "8"])
def test_sample_counts_must_be_positive_integers(value):
    with pytest.raises(InvalidArgumentError, match=repr(value)):
        check_samples(value)
