"""Running the bnnify app in-process for the CLI tests."""

from __future__ import annotations

import sys
from pathlib import Path

from typer.testing import CliRunner

from bnnify.cli.main import app

__all__ = ["BNNIFY", "flat", "invoke", "runner"]

BNNIFY = Path(sys.executable).parent / "bnnify"
runner = CliRunner()


def invoke(*args, env=None):
    """Runs `bnnify ARGS` through Typer's CliRunner; a traceback fails the test."""
    result = runner.invoke(app, [str(a) for a in args], env=env)
    assert "Traceback" not in result.output
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def flat(text: str) -> str:
    """`text` with its line wrapping undone (Rich wraps piped stderr)."""
    return " ".join(text.split())
