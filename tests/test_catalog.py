"""Tests of bnnify.catalog: the static table of `bnnify list` matches the live registries."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest
import torch

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
        assert description
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
