"""Tests of bnnify.formats.plots: files that decode, numbers drawn that are the metrics."""

from __future__ import annotations

import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib

import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import imread

from bnnify.bnn.metrics import (
    CALIBRATION_LEVELS,
    expected_calibration_error,
    interval_coverage,
    quantile_calibration_error,
    quantile_coverage,
    reliability_bins,
)
from bnnify.bnn.mixture import gaussian_mixture_cdf, gaussian_mixture_quantile
from bnnify.errors import (
    EXIT_USAGE,
    InputError,
    InvalidArgumentError,
    OutputExistsError,
    UsageError,
)
from bnnify.formats import plots


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, whose CRC is checked; the pixels by matplotlib."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert zlib.crc32(data[12 : 16 + length]) == crc
    width, height = struct.unpack(">II", data[16:24])
    assert imread(path).shape[:2] == (height, width)
    return width, height


def svg_root(path) -> ET.Element:
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return root


@pytest.fixture
def drawn_figures(monkeypatch):
    """The Figure objects saved during a test, to read back what was drawn."""
    figures: list[Figure] = []
    save = Figure.savefig

    def record(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def classification_data(n: int = 400):
    probs = (2 * torch.randn(n, 4)).softmax(-1)
    return probs, torch.multinomial(probs, 1).squeeze(1)


def regression_data(n: int = 200, s: int = 8):
    x = torch.rand(n) * 6 - 3
    samples = torch.sin(x)[None] + 0.3 * torch.randn(s, 1) * x[None]
    return x, samples, torch.sin(x) + 0.3 * torch.randn(n)


# ------------------------------------------------------------------- figures


def test_reliability_diagram_draws_the_bins_and_the_ece(tmp_path, drawn_figures):
    probs, labels = classification_data()
    path = tmp_path / "reliability.png"
    drawn = plots.reliability_diagram(probs, labels, path, bins=10)
    assert png_size(path) == (640, 480)
    table = reliability_bins(probs, labels, 10)
    for key in ("counts", "accuracy", "confidence", "edges"):
        assert drawn[key] == pytest.approx(table[key].tolist(), rel=1e-12)
    assert drawn["ece"] == pytest.approx(expected_calibration_error(probs, labels, 10))
    top, bottom = drawn_figures[0].axes
    assert [bar.get_height() for bar in top.patches] == pytest.approx(drawn["accuracy"])
    assert [bar.get_height() for bar in bottom.patches] == drawn["counts"]
    assert f"ECE = {drawn['ece']:.4f} (10 bins)" in top.get_title()


def test_coverage_curve_draws_the_coverage_of_the_metrics(tmp_path, drawn_figures):
    _, samples, y = regression_data()
    path = tmp_path / "coverage.svg"
    drawn = plots.coverage_curve(samples, 0.3, y, path)
    svg_root(path)
    pit = gaussian_mixture_cdf(samples, 0.3, y)
    assert drawn["levels"] == pytest.approx(list(CALIBRATION_LEVELS))
    assert drawn["interval_coverage"] == pytest.approx(
        interval_coverage(pit, CALIBRATION_LEVELS).tolist()
    )
    assert drawn["quantile_coverage"] == pytest.approx(quantile_coverage(pit).tolist())
    assert drawn["calibration_error"] == pytest.approx(quantile_calibration_error(pit))
    lines = drawn_figures[0].axes[0].get_lines()
    assert list(lines[1].get_ydata()) == pytest.approx(drawn["interval_coverage"])
    assert list(lines[2].get_ydata()) == pytest.approx(drawn["quantile_coverage"])


def test_layer_chart_draws_kl_and_snr_on_the_scale_they_need(tmp_path, drawn_figures):
    kl = {"0.weight": 1500.0, "0.bias": 2.0, "2.weight": 40.0}
    snr = {"0.weight": 0.5, "0.bias": 2.0, "2.weight": 1.0}
    path = tmp_path / "layers.png"
    drawn = plots.layer_chart(kl, snr, path)
    assert png_size(path) == tuple(drawn["size"]) == (1280, 480)
    assert drawn["kl"] == {"names": list(kl), "values": list(kl.values()), "log_scale": True}
    assert drawn["snr"]["log_scale"] is False  # a ratio of 4
    left, right = drawn_figures[0].axes
    assert left.get_xscale() == "log" and right.get_xscale() == "linear"
    assert [bar.get_width() for bar in left.patches] == pytest.approx(list(kl.values()))
    # One panel, and a KL that is zero somewhere stays linear.
    drawn = plots.layer_chart({"a": 0.0, "b": 500.0}, None, tmp_path / "kl.svg")
    assert "snr" not in drawn and drawn["kl"]["log_scale"] is False
    svg_root(tmp_path / "kl.svg")


def test_sigma_histogram_counts_every_weight(tmp_path, drawn_figures):
    sigma = {"a": torch.rand(3, 50) * 0.01 + 1e-4, "b": torch.rand(20) + 0.5}
    path = tmp_path / "sigma.png"
    drawn = plots.sigma_histogram(sigma, path, bins=20)
    png_size(path)
    values = torch.cat([sigma["a"].reshape(-1), sigma["b"]]).double()
    assert drawn["log_scale"] is True and drawn["count"] == sum(drawn["counts"]) == 170
    edges = torch.tensor(drawn["edges"], dtype=torch.float64)
    assert (edges[1:] / edges[:-1]).tolist() == pytest.approx([float(edges[1] / edges[0])] * 20)
    # Counted independently: the bin of each value is the last edge at or below it.
    index = (torch.searchsorted(edges, values, right=True) - 1).clamp_max(19)
    assert drawn["counts"] == torch.bincount(index, minlength=20).tolist()
    assert drawn["min"] == pytest.approx(float(values.min()))
    assert drawn_figures[0].axes[0].get_xscale() == "log"
    # A spread below a factor of 100 gets linear bins, one value a bin around it.
    assert plots.sigma_histogram(torch.full((5,), 0.2), tmp_path / "one.png")["counts"][25] == 5


def test_predictive_bands_are_the_mixture_and_sample_quantiles(tmp_path, drawn_figures):
    x, samples, y = regression_data(n=50)
    path = tmp_path / "bands.png"
    drawn = plots.predictive_bands(x[:, None], samples[..., None], 0.3, path, data=(x, y))
    png_size(path)
    order = x.argsort()
    assert drawn["x"] == pytest.approx(x[order].tolist())
    assert drawn["mean"] == pytest.approx(samples.mean(0)[order].tolist())
    bounds = gaussian_mixture_quantile(samples, 0.3, [0.025, 0.975])[:, order]
    assert drawn["total_lower"] == pytest.approx(bounds[0].tolist())
    assert drawn["total_upper"] == pytest.approx(bounds[1].tolist())
    # Epistemic: the sampled functions' own 2.5% and 97.5% points (interpolated).
    for i, j in enumerate(order.tolist()):
        ranked = samples[:, j].double().sort().values  # 8 samples: position 0.025 * 7
        low = ranked[0] + 0.175 * (ranked[1] - ranked[0])
        assert drawn["epistemic_lower"][i] == pytest.approx(float(low))
    assert all(t <= e for t, e in zip(drawn["total_lower"], drawn["epistemic_lower"], strict=True))
    assert len(drawn_figures[0].axes[0].collections) == 3  # two bands and the data


# -------------------------------------------------------------------- errors


def test_without_matplotlib_drawing_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    probs, labels = classification_data(20)
    with pytest.raises(UsageError, match=r"pip install 'bnnify\[plot\]'") as error:
        plots.reliability_diagram(probs, labels, tmp_path / "r.png")
    assert error.value.exit_code == EXIT_USAGE
    assert list(tmp_path.iterdir()) == []


def test_importing_bnnify_does_not_import_matplotlib():
    code = (
        "import sys, bnnify, bnnify.bnn, bnnify.formats.plots, bnnify.cli.main; "
        "assert not any(m.startswith('matplotlib') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_nothing_is_written_on_error(tmp_path, monkeypatch):
    probs, labels = classification_data(20)
    with pytest.raises(InputError, match="labels of shape"):
        plots.reliability_diagram(probs, labels[:10], tmp_path / "r.png")
    with pytest.raises(InvalidArgumentError, match="one input"):
        plots.predictive_bands(torch.zeros(5, 2), torch.zeros(3, 5), 1.0, tmp_path / "b.png")
    with pytest.raises(InvalidArgumentError, match="positive"):
        plots.sigma_histogram(torch.tensor([0.1, -1.0]), tmp_path / "s.png")

    def broken(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        plots.reliability_diagram(probs, labels, tmp_path / "r.png")
    assert list(tmp_path.iterdir()) == []  # no file, no temporary file


def test_an_existing_file_is_kept_without_force(tmp_path):
    probs, labels = classification_data(20)
    path = tmp_path / "r.svg"
    path.write_text("keep")
    with pytest.raises(OutputExistsError):
        plots.reliability_diagram(probs, labels, path)
    assert path.read_text() == "keep"
    plots.reliability_diagram(probs, labels, path, force=True)
    svg_root(path)


@pytest.mark.parametrize(
    ("name", "image_format", "written"),
    [("f", None, "png"), ("f.SVG", None, "svg"), ("f", "svg", "svg"), ("f.png", "png", "png")],
)
def test_the_format_follows_the_suffix_or_the_request(tmp_path, name, image_format, written):
    probs, labels = classification_data(20)
    plots.reliability_diagram(probs, labels, tmp_path / name, image_format=image_format)
    if written == "png":
        png_size(tmp_path / name)
    else:
        svg_root(tmp_path / name)


@pytest.mark.parametrize(
    ("name", "image_format"), [("f.pdf", None), ("f.png", "svg"), ("f", "jpg")]
)
def test_a_format_that_cannot_be_written_is_refused(tmp_path, name, image_format):
    probs, labels = classification_data(20)
    with pytest.raises(UsageError, match="formats: \\['png', 'svg'\\]"):
        plots.reliability_diagram(probs, labels, tmp_path / name, image_format=image_format)
    assert list(tmp_path.iterdir()) == []
