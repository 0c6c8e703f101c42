"""Tests of bnnify.catalog: `bnnify list`, read from the source, matches the live registries."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from bnnify import catalog
from bnnify.bnn import PosteriorFactory, PriorFactory
from bnnify.bnn.posteriors import init_function
from bnnify.catalog import POSTERIORS, PRIORS
from bnnify.errors import InvalidArgumentError

TABLES = [(POSTERIORS, PosteriorFactory), (PRIORS, PriorFactory)]


def registered(factory) -> dict[type, set[str]]:
    """Each registered class and every name it is registered under."""
    names: dict[type, set[str]] = {}
    for name in factory.names:
        names.setdefault(factory[name], set()).add(name)
    return names


def keyword_defaults(function) -> dict[str, object]:
    params = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}


def prior_arguments(cls) -> dict[str, object]:
    """Keyword-only arguments of `__init__` that `from_param` accepts (as a spec passes them)."""
    accepted = {}
    for name, default in keyword_defaults(cls.__init__).items():
        try:
            cls.from_param(torch.zeros(3), **{name: default})
        except InvalidArgumentError:
            continue
        accepted[name] = default
    return accepted


@pytest.mark.parametrize(("table", "factory"), TABLES, ids=["posteriors", "priors"])
def test_names_aliases_and_classes_match_the_registry(table, factory):
    classes = registered(factory)
    assert len(table) == len(classes)
    for name, (aliases, class_name, _, description) in table.items():
        cls = factory[name]
        assert cls.__name__ == class_name
        assert {name, *aliases} == classes[cls]
        # The description is the first paragraph of the class docstring.
        summary = " ".join(inspect.getdoc(cls).split("\n\n")[0].split())
        assert description and summary == description + "."
    listed = {n for name, (aliases, *_) in table.items() for n in (name, *aliases)}
    assert listed == set(factory.names)


def test_posterior_arguments_match_from_param():
    for name, (_, _, arguments, _) in POSTERIORS.items():
        assert arguments == keyword_defaults(init_function(PosteriorFactory[name])), name


def test_prior_arguments_match_their_constructors():
    for name, (_, _, arguments, _) in PRIORS.items():
        assert arguments == prior_arguments(PriorFactory[name]), name
    # The empirical prior takes its mean from the weights: only sigma is an argument.
    assert PRIORS["empirical_gaussian"][2] == {"sigma": 1.0}
    with pytest.raises(InvalidArgumentError, match="'mu'"):
        PriorFactory["empirical_gaussian"].from_param(torch.zeros(3), mu=0.0)


def test_the_cli_wiring_does_not_import_torch(tmp_path):
    """`--help`, `--version` and `list` stay fast: only the commands that need torch import it."""
    code = textwrap.dedent(
        """
        import runpy, sys
        import bnnify
        assert "torch" not in sys.modules, "import bnnify imported torch"
        assert callable(bnnify.__getattr__) and "convert" in dir(bnnify)
        import bnnify.cli.main
        assert "torch" not in sys.modules, "import bnnify.cli.main imported torch"
        for argv in (["--help"], ["--version"], ["list", "--json"], ["list"]):
            sys.argv = ["bnnify", *argv]
            try:
                runpy.run_module("bnnify", run_name="__main__")
            except SystemExit as exit:
                assert exit.code in (0, None), (argv, exit.code)
            assert "torch" not in sys.modules, f"bnnify {argv} imported torch"
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert '"posteriors"' in done.stdout


def test_names_follow_the_decorators_and_the_source_order():
    assert list(POSTERIORS) == ["gaussian", "pretrained_gaussian"]
    assert list(PRIORS) == ["gaussian", "empirical_gaussian", "laplace", "scale_mixture"]
    assert POSTERIORS["gaussian"].aliases == ("normal",)
    assert PRIORS["scale_mixture"].arguments["sigma2"] == math.exp(-6)


def test_a_source_registration_is_read_without_importing_it():
    source = textwrap.dedent(
        """
        @PriorFactory.register("Wide")
        @PriorFactory.register("broad")
        class WidePrior(GaussianPrior):
            \"\"\"N(0, 10^2), wide.

            More text.
            \"\"\"

            @classmethod
            def from_param(cls, param, **kwargs):
                return cls(shape=param.shape, sigma=10.0, **kwargs)


        class GaussianPrior(Prior):
            def __init__(self, shape=(), dtype=None, device=None, *, mu=0.0, sigma=1.0):
                pass
        """
    )
    table = catalog.read_registrations(source, "priors")
    assert table == {"wide": (("broad",), "WidePrior", {"mu": 0.0}, "N(0, 10^2), wide")}
