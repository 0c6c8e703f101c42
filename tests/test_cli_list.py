"""Tests of `bnnify list`, `--version`, `--help` and `python -m bnnify`."""

from __future__ import annotations

import json
import subprocess
import sys

from cli_helpers import invoke

import bnnify
from bnnify.bnn import PosteriorFactory, PriorFactory
from bnnify.catalog import POSTERIORS, PRIORS


def test_list_json_has_every_posterior_and_prior():
    result = invoke("list", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert set(data) == {"schema", "posteriors", "priors"}
    for kind, table, factory in (
        ("posteriors", POSTERIORS, PosteriorFactory),
        ("priors", PRIORS, PriorFactory),
    ):
        rows = {row["name"]: row for row in data[kind]}
        assert list(rows) == list(table)
        for name, row in rows.items():
            aliases, cls, arguments, description = table[name]
            assert row["aliases"] == list(aliases)
            assert row["class"] == cls == factory[name].__name__
            assert row["arguments"] == arguments
            assert row["description"] == description
    priors = {row["name"]: row for row in data["priors"]}
    assert priors["laplace"]["arguments"] == {"mu": 0.0, "scale": 1.0}
    assert priors["empirical_gaussian"]["arguments"] == {"sigma": 1.0}


def test_list_tables():
    result = invoke("list")
    assert result.exit_code == 0
    out = result.stdout
    assert "Posteriors" in out and "Priors" in out
    for name in [*POSTERIORS, *PRIORS]:
        assert name in out
    assert "mu=0.0, scale=1.0" in out


def test_version_and_help():
    version = invoke("--version")
    assert (version.exit_code, version.stdout) == (0, f"bnnify {bnnify.__version__}\n")
    for args in (["--help"], ["-h"], ["convert", "--help"], ["kl", "--help"]):
        result = invoke(*args)
        assert result.exit_code == 0
        text = " ".join(result.stdout.split())
        assert "Exit codes: 0 success; 1 runtime failure" in text
        assert "3 input refused as unsafe" in text and "130 interrupted" in text
    commands = " ".join(invoke("--help").stdout.split())
    for command in ("convert", "kl", "inspect", "list"):
        assert f" {command} " in commands
    assert invoke().exit_code in (0, 2)  # no arguments: the help


def test_an_unknown_command_is_a_usage_error():
    result = invoke("convrt")
    assert result.exit_code == 2
    assert "convrt" in result.output


def test_python_m_bnnify(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bnnify", "list", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads(invoke("list", "--json").stdout)
    done = subprocess.run(
        [sys.executable, "-m", "bnnify", "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, f"bnnify {bnnify.__version__}\n")
    assert list(tmp_path.iterdir()) == []
