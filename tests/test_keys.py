"""Tests of bnnify.bnn.keys: the one naming scheme of a parameter's variational tensors."""

from __future__ import annotations

import pytest

from bnnify.bnn.keys import posterior_key, prior_key, split_key

NAMES = ["weight", "fc.weight", "encoder.layers.0.prior.weight", "prior", "a.prior"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("part", ["mu", "rho", "loc.0"])
def test_split_inverts_both_makers(name, part):
    assert split_key(posterior_key(name, part), name) == ("posterior", part)
    assert split_key(prior_key(name, part), name) == ("prior", part)


def test_keys_of_other_parameters_are_not_split():
    assert split_key("fc.weight.mu", "fc.bias") is None
    assert split_key("fc.weight.mu", "fc") == ("posterior", "weight.mu")
    assert split_key("fc.weight", "fc.weight") is None
    assert split_key("fc.weight.", "fc.weight") is None


def test_a_parameter_named_prior_is_not_a_prior_tensor():
    # A module attribute called "prior" is part of the name, not the prior namespace.
    assert split_key("net.prior.weight.mu", "net.prior.weight") == ("posterior", "mu")
    assert split_key("prior.mu", "prior") == ("posterior", "mu")
    assert split_key("prior.prior.mu", "prior") == ("prior", "mu")
