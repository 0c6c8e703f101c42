"""Tests of `bnnify plot` through the entry point."""

from __future__ import annotations

import json
import sys

import pytest
from fit_files import cli, shared_fit_files, single_thread
from test_plots import png_size, svg_root

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return shared_fit_files(tmp_path_factory)


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with single_thread():
        yield


def test_predict_then_plot_json_and_human(files, tmp_path):
    test = files.cls_test
    common = ("-m", files.cls_model, "-i", test, "--targets", test, "--samples", "4")
    assert cli("predict", files.cls_fitted, *common, "-o", "p.safetensors").exit_code == 0
    result = cli("plot", files.cls_fitted, "-p", "p.safetensors", "-o", ".", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert next(iter(info)) == "schema" and info["schema"] == "bnnify.plot/1"
    assert set(info["figures"]) == {"layers", "sigma", "reliability"}
    for figure in info["figures"].values():
        png_size(tmp_path / figure["path"])
    human = cli("plot", "-p", "p.safetensors", "--format", "svg", "--figure", "reliability")
    assert human.exit_code == 0 and "reliability: wrote" in human.stdout and "ece" in human.stdout
    svg_root(tmp_path / "p.reliability.svg")


def test_usage_errors_exit_2(files):
    assert cli("plot").exit_code == 2
    again = cli("plot", files.cls_fitted, "-o", ".", "--figure", "sigma")
    assert again.exit_code == 0
    exists = cli("plot", files.cls_fitted, "-o", ".", "--figure", "sigma")
    assert exists.exit_code == 2 and "--force" in exists.stderr
    unknown = cli("plot", files.cls_fitted, "--figure", "pie")
    assert unknown.exit_code == 2


def test_without_matplotlib_plot_says_how_to_install_it(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = cli("plot", files.cls_fitted, "-o", ".")
    assert result.exit_code == 2
    assert "pip install 'bnnify[plot]'" in " ".join(result.stderr.split())


def test_an_unknown_image_format_is_a_usage_error(files):
    result = cli("plot", files.cls_fitted, "--format", "jpg")
    assert result.exit_code == 2 and "png" in result.stderr
