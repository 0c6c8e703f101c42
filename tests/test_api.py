"""Tests of bnnify.api and the package: one function per command, loaded on first use."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest

import bnnify
from bnnify import api


def test_the_package_exports_the_api():
    for name in api.__all__:
        assert getattr(bnnify, name) is getattr(api, name)
        assert name in bnnify.__all__ and name in dir(bnnify)
    with pytest.raises(AttributeError, match="no attribute 'conver'"):
        bnnify.conver  # noqa: B018


def test_one_function_per_command_returning_what_it_prints():
    for name, result in (
        ("convert", api.ConversionResult),
        ("fit", api.FitResult),
        ("predict", api.PredictionResult),
        ("kl", api.KLResult),
        ("inspect", api.InspectResult),
    ):
        function = getattr(api, name)
        assert inspect.signature(function).return_annotation in (result.__name__, result)
        assert callable(result.to_json)
        assert function.__doc__ and "Raises:" in function.__doc__


def test_import_bnnify_does_not_import_torch(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        import bnnify, bnnify.errors, bnnify.enums
        assert "torch" not in sys.modules
        bnnify.__version__
        assert "torch" not in sys.modules
        bnnify.convert
        assert "torch" in sys.modules
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
