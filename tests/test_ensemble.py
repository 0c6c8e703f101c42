"""Tests of bnnify.bnn.ensemble: K weight sets in one module, the same moments every way."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from bnnify.bnn.ensemble import Ensemble, StackedEnsemble, ensemble_moments
from bnnify.bnn.metrics import regression_summary


def _members(k: int) -> list[nn.Module]:
    return [nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).eval() for _ in range(k)]


def test_moments_are_those_of_the_predictive_summary():
    outputs = torch.randn(5, 4, 2)
    mean, std = ensemble_moments(outputs, False, 0.0)
    summary = regression_summary(outputs, 0.0)
    torch.testing.assert_close(mean, summary["mean"], rtol=0, atol=1e-6)
    torch.testing.assert_close(std, summary["epistemic_std"], rtol=0, atol=1e-6)
    _, total = ensemble_moments(outputs, False, 0.3)
    torch.testing.assert_close(total, regression_summary(outputs, 0.3)["std"])


def test_softmax_averages_probabilities():
    logits = torch.randn(3, 4, 5)
    mean, std = ensemble_moments(logits, True, 0.0)
    torch.testing.assert_close(mean.sum(-1), torch.ones(4))
    assert (std >= 0).all()


def test_an_ensemble_is_its_members_run_in_turn_and_scripts():
    members = _members(3)
    x = torch.randn(7, 3)
    expected = ensemble_moments(torch.stack([m(x) for m in members]), False, 0.0)
    ensemble = Ensemble(members)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated
        scripted = torch.jit.script(ensemble)
    for module in (ensemble, scripted):
        for got, want in zip(module(x), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batched", [True, False])
def test_stacked_weights_give_the_members_outputs(batched):
    members = _members(4)
    names = [n for n, _ in members[0].named_parameters()]
    stacked = {
        n: torch.stack([dict(m.named_parameters())[n].detach() for m in members]) for n in names
    }
    x = torch.randn(6, 3)
    outputs = torch.stack(
        [functional_call(members[0], dict(m.named_parameters()), (x,)) for m in members]
    )
    expected = ensemble_moments(outputs, True, 0.0)
    module = StackedEnsemble(members[0], stacked, batched=batched, softmax=True)
    with torch.no_grad():
        for got, want in zip(module(x), expected, strict=True):
            # vmap's batched matmul may round differently from K single ones.
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert module.count == 4 and module.names == names
