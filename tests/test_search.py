"""Tests of bnnify.usecases.search: the grid of `fit --search`, its specs and spreads."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fit_files import shared_fit_files, single_thread

from bnnify.errors import UsageError
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.model_files import load_model
from bnnify.formats.spec import DEFAULT_SPEC
from bnnify.usecases.runner import open_runner
from bnnify.usecases.search import GRID, GridPoint, grid, respread_, search_spec

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    return shared_fit_files(tmp_path_factory)


def test_the_grid_is_every_combination_once_in_a_fixed_order():
    points = grid()
    assert len(points) == len(set(points)) == 12
    assert points == grid()
    for name, values in GRID.items():
        assert {getattr(p, name) for p in points} == set(values)


@pytest.mark.parametrize(("prior", "argument"), [("gaussian", "sigma"), ("laplace", "scale")])
def test_search_spec_sets_the_prior_scale_and_the_initial_spread(prior, argument):
    spec = dataclasses.replace(DEFAULT_SPEC, prior=(prior, {}))
    chosen = search_spec(spec, GridPoint(prior_scale=0.1, posterior_delta=0.03, kl_weight=1.0))
    assert chosen.prior == (prior, {argument: 0.1})
    assert chosen.posterior == ("pretrained_gaussian", {"delta": 0.03})
    assert spec.prior == (prior, {})  # the given spec is left as it was


def test_a_prior_without_a_known_scale_is_refused():
    spec = dataclasses.replace(DEFAULT_SPEC, prior=("scale_mixture", {}))
    with pytest.raises(UsageError, match="'scale_mixture'") as error:
        search_spec(spec, grid()[0])
    assert "--prior gaussian" in error.value.hint


@pytest.mark.parametrize("delta", [0.01, 0.1])
def test_respread_sets_sigma_to_delta_times_the_mean(files, delta):
    with single_thread(), Checkpoint(files.reg_ckpt) as ckpt:
        runner = open_runner(load_model(files.reg_model), ckpt)
        means = {k: v.clone() for k, v in runner.bnn.variational_state().items()}
        respread_(runner, delta, min_sigma=1e-6)
        state = runner.bnn.variational_state()
        for name in runner.bnn.reparametrized_names():
            mu, rho = state[f"{name}.mu"], state[f"{name}.rho"]
            assert torch.equal(mu, means[f"{name}.mu"])  # the means are kept
            expected = (delta * mu.abs()).clamp(min=1e-6)
            torch.testing.assert_close(torch.nn.functional.softplus(rho), expected)
