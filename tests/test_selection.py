"""Choosing what becomes Bayesian by module kind (--only, --skip), where kinds are known."""

from __future__ import annotations

import io
import json
import warnings

import pytest
import torch
from cli_helpers import invoke
from test_kinds import EXPECTED, Mixed

from bnnify.demo import build_model
from bnnify.formats.spec import resolve_spec

ARCH = ["--arch", "bnnify.demo:build_model", "--arch-kwargs", "{}"]
TOKENS = torch.tensor([[1, 2, 3], [4, 0, 1]])


def selected(expected: dict[str, str], *, only=(), skip=()) -> list[str]:
    return [n for n, k in expected.items() if (not only or k in only) and k not in skip]


def save(tmp_path, fmt: str):
    torch.manual_seed(0)
    module = Mixed().eval()
    path = tmp_path / f"mixed.{fmt}"
    if fmt == "ts":
        torch.jit.save(torch.jit.script(module), str(path))
    else:
        buffer = io.BytesIO()
        with warnings.catch_warnings():  # the GRU refreshes `_flat_weights` while traced
            warnings.filterwarnings("ignore", message="The tensor attributes", category=UserWarning)
            torch.export.save(torch.export.export(module, (TOKENS,)), buffer)
        path.write_bytes(buffer.getvalue())
    return path


def convert(path, tmp_path, *flags):
    out = tmp_path / f"{path.stem}.{len(list(tmp_path.iterdir()))}.bnn.safetensors"
    result = invoke("convert", path, "-o", out, "--json", *flags)
    return result, (json.loads(result.stdout) if result.exit_code == 0 else None)


@pytest.mark.parametrize("fmt", ["ts", "pt2"])
@pytest.mark.parametrize(
    ("flags", "only", "skip"),
    [
        (["--only", "linear,conv"], ("linear", "conv"), ()),
        (["--skip", "norm", "--skip", "embedding"], (), ("norm", "embedding")),
        (
            ["--only", "attention,rnn,other", "--skip", "rnn"],
            ("rnn", "attention", "other"),  # in the order of ModuleKind
            ("rnn",),
        ),
    ],
    ids=["only", "skip", "both"],
)
def test_kinds_choose_the_parameters_of_programs(tmp_path, fmt, flags, only, skip):
    path = save(tmp_path, fmt)
    result, data = convert(path, tmp_path, *flags)
    assert result.exit_code == 0, result.output
    names = sorted(p["name"] for p in data["parameters"])
    assert names == sorted(selected(EXPECTED, only=only, skip=skip))
    assert data["spec"].get("only") == (list(only) or None)
    assert data["spec"].get("skip", []) == list(skip)


def test_kinds_and_name_patterns_combine(tmp_path):
    flags = ["--only", "linear,conv", "--exclude", "*.bias"]
    _, data = convert(save(tmp_path, "ts"), tmp_path, *flags)
    assert sorted(p["name"] for p in data["parameters"]) == ["b.weight", "f.weight"]


def test_kinds_choose_the_parameters_of_an_architecture(tmp_path):
    torch.save(build_model().state_dict(), tmp_path / "sd.pt")
    spec = tmp_path / "spec.yaml"
    spec.write_text('arch: "bnnify.demo:build_model"\nskip: [norm]\n')
    result, data = convert(tmp_path / "sd.pt", tmp_path, "-c", spec, *ARCH)
    assert result.exit_code == 0, result.output
    assert [p["name"] for p in data["parameters"]] == ["0.weight", "0.bias", "3.weight", "3.bias"]


def test_kinds_are_refused_for_a_state_dict_without_architecture(tmp_path):
    torch.save(build_model().state_dict(), tmp_path / "sd.pt")
    result, _ = convert(tmp_path / "sd.pt", tmp_path, "--skip", "norm")
    assert result.exit_code == 2 and result.stdout == ""
    assert "module kinds are unknown" in result.stderr and "--exclude" in result.stderr


def test_an_unknown_kind_is_a_usage_error_with_a_suggestion(tmp_path):
    result, _ = convert(save(tmp_path, "ts"), tmp_path, "--only", "linera")
    assert result.exit_code == 2 and "Did you mean 'linear'" in result.stderr


def test_kinds_leaving_nothing_are_refused(tmp_path):
    torch.jit.save(torch.jit.script(build_model()), str(tmp_path / "m.pt"))
    result, _ = convert(tmp_path / "m.pt", tmp_path, "--only", "rnn")
    assert result.exit_code == 2 and "no tensor to reparametrize" in result.stderr


def test_resolve_spec_reads_kinds_from_flags_and_documents():
    spec = resolve_spec({"skip": "embedding, norm"}, only=["conv,linear"])
    assert spec.only == ("linear", "conv") and spec.skip == ("norm", "embedding")
    assert resolve_spec(spec.to_json()) == spec
