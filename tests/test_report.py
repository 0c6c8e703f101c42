"""Tests of bnnify.formats.report: the KL report file (docs/format.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bnnify.errors import FormatError, InputError
from bnnify.formats.report import REPORT_FORMAT, KLReport, is_report, read_report, write_report
from bnnify.formats.safetensors_io import load_file, read_header, save_file


def sample_report(samples=None) -> KLReport:
    return KLReport(
        names=["fc.weight", "fc.bias"],
        per_parameter=[12.5, 0.25],
        numels=[6, 2],
        method="analytic" if samples is None else "monte_carlo",
        samples=samples,
        posterior={"name": "pretrained_gaussian", "kwargs": {"delta": 0.1}},
        prior={"name": "laplace", "kwargs": {"scale": 0.5}},
        checkpoint={"name": "m.bnn.safetensors", "source_sha256": "ab" * 32},
    )


@pytest.mark.parametrize("samples", [None, 16])
def test_a_report_round_trips(tmp_path, samples):
    report = sample_report(samples)
    write_report(report, tmp_path / "r.kl.safetensors")
    assert is_report(tmp_path / "r.kl.safetensors")
    back = read_report(tmp_path / "r.kl.safetensors")
    assert back.to_json() == report.to_json()
    assert all(type(v) is float for v in back.per_parameter)
    assert all(type(n) is int for n in back.numels)


def test_a_report_is_read_without_torch(tmp_path):
    """A subprocess reads a report: torch is never imported (reading costs no torch start)."""
    write_report(sample_report(), tmp_path / "r.kl.safetensors")
    code = (
        "import sys; from bnnify.formats.report import read_report; "
        f"r = read_report({str(tmp_path / 'r.kl.safetensors')!r}); "
        "assert r.total == 12.75, r.total; assert 'torch' not in sys.modules, 'torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_total_that_overflows_is_an_error_not_infinity():
    huge = KLReport(["a", "b"], [1.5e308, 1.5e308], [1, 1], "analytic", None, {}, {})
    with pytest.raises(InputError, match="total KL divergence is inf"):
        huge.to_json()


def test_the_file_layout_is_the_documented_one(tmp_path):
    write_report(sample_report(), tmp_path / "r.kl.safetensors")
    metadata, _ = read_header(tmp_path / "r.kl.safetensors")
    tensors = load_file(tmp_path / "r.kl.safetensors")
    assert metadata["bnnify.format"] == REPORT_FORMAT == "bnnify.kl_report"
    assert metadata["bnnify.format_version"] == "1"
    assert json.loads(metadata["bnnify.names"]) == ["fc.weight", "fc.bias"]
    assert metadata["bnnify.method"] == "analytic"
    assert json.loads(metadata["bnnify.samples"]) is None
    assert float(tensors["kl.sum"]) == 12.75
    assert float(tensors["kl.mean"]) == 12.75 / 8
    assert tensors["kl.per_parameter"].tolist() == [12.5, 0.25]
    assert tensors["numel.per_parameter"].tolist() == [6, 2]


def test_totals_and_json():
    report = sample_report()
    assert report.total == 12.75
    assert report.mean == 12.75 / 8
    data = report.to_json()
    assert data["kl"]["sum"] == 12.75 and data["elements"] == 8
    assert [(p["name"], p["kl"], p["elements"]) for p in data["parameters"]] == [
        ("fc.weight", 12.5, 6),
        ("fc.bias", 0.25, 2),
    ]
    assert [p["name"] for p in report.to_json(top=1)["parameters"]] == ["fc.weight"]
    empty = KLReport([], [], [], "analytic", None, {}, {})
    assert (empty.total, empty.mean) == (0.0, 0.0)


def test_other_files_are_not_reports(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "plain.safetensors", {"bnnify.format": "other"})
    (tmp_path / "text").write_text("hello")
    for path in (tmp_path / "plain.safetensors", tmp_path / "text", tmp_path / "missing"):
        assert not is_report(path)
    with pytest.raises(FormatError, match="not a bnnify KL report"):
        read_report(tmp_path / "plain.safetensors")


def test_an_unknown_report_version_is_refused(tmp_path):
    write_report(sample_report(), tmp_path / "r.kl.safetensors")
    metadata, _ = read_header(tmp_path / "r.kl.safetensors")
    tensors = load_file(tmp_path / "r.kl.safetensors")
    save_file(tensors, tmp_path / "v2.safetensors", {**metadata, "bnnify.format_version": "2"})
    with pytest.raises(FormatError, match="version '2' is not supported") as error:
        read_report(tmp_path / "v2.safetensors")
    assert "bnnify kl" in error.value.hint


@pytest.mark.parametrize(
    "change",
    [
        {"bnnify.names": '["only one"]'},
        {"bnnify.names": "not json"},
        {"bnnify.prior": "{"},
    ],
)
def test_malformed_reports_are_refused(tmp_path, change):
    write_report(sample_report(), tmp_path / "r.kl.safetensors")
    metadata, _ = read_header(tmp_path / "r.kl.safetensors")
    tensors = load_file(tmp_path / "r.kl.safetensors")
    save_file(tensors, tmp_path / "bad.safetensors", {**metadata, **change})
    with pytest.raises(FormatError, match="malformed KL report"):
        read_report(tmp_path / "bad.safetensors")


def test_a_report_without_its_tensors_is_refused(tmp_path):
    write_report(sample_report(), tmp_path / "r.kl.safetensors")
    metadata, _ = read_header(tmp_path / "r.kl.safetensors")
    save_file({"kl.sum": torch.tensor(1.0)}, tmp_path / "bad.safetensors", metadata)
    with pytest.raises(FormatError, match="malformed KL report"):
        read_report(tmp_path / "bad.safetensors")
