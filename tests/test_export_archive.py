"""Tests of `bnnify.formats.export_archive`: crafted .pt2 archives that would run code are refused.

The constructions (`pt2_files.UNSAFE`) are built in `tmp_path` from real
`torch.export.save` archives; each payload writes a marker file when unpickled or run.
Each test asserts the refusal, its exit code, and that the marker does not exist;
`test_the_payloads_are_live` shows that torch itself, unguarded, runs them.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import pickle
import subprocess
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import sympy
import torch
from cli_helpers import BNNIFY, flat, invoke
from pt2_files import (
    LIVE,
    MODEL,
    ROOT,
    UNSAFE,
    Payload,
    archive_members,
    build,
    pickled,
    save_programs,
    write,
)
from safetensors.torch import load_file

from bnnify.errors import EXIT_RUNTIME, EXIT_UNSAFE, FormatError, UnsafeInputError
from bnnify.formats.detect import ModelFormat, detect_format
from bnnify.formats.export_archive import guarded, unlift
from bnnify.formats.model_files import load_model


@pytest.fixture(scope="module")
def saved():
    return save_programs()


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PAYLOAD-RAN"


@pytest.fixture
def craft(saved, tmp_path, marker, monkeypatch):
    """craft(name) -> the path of construction `name`, built in tmp_path."""
    env = {"marker": marker, "tmp_path": tmp_path, "monkeypatch": monkeypatch}
    return lambda name: build(name, saved, env)


def _unguarded_load(path: Path):
    with open(path, "rb") as stream:
        return torch.export.load(stream)


# ----------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(UNSAFE))
def test_crafted_archives_are_refused_without_running_their_payload(craft, marker, name):
    path = craft(name)
    with pytest.raises(UnsafeInputError, match="--trust-pickle") as caught:
        load_model(path)
    assert caught.value.exit_code == EXIT_UNSAFE
    assert "unsafe torch.export archive" in caught.value.message
    assert "\n" not in caught.value.message and "\x1b" not in caught.value.message
    assert not marker.exists()


@pytest.mark.parametrize("name", LIVE)
def test_the_payloads_are_live(craft, marker, name):
    """torch.export.load, unguarded, runs each payload: the refusals above are real."""
    path = craft(name)
    with contextlib.suppress(Exception):
        _unguarded_load(path)
    assert marker.exists()


def test_a_guard_that_module_compiles_is_live_when_trusted(craft, marker):
    with load_model(craft("input-guard"), trust_pickle=True) as model:
        module = unlift(model.module, model.path)
        with contextlib.suppress(Exception):
            module(torch.randn(3, 4))
    assert marker.exists()


@pytest.mark.parametrize(
    "name",
    [
        *("a-legacy-fallback", "a-legacy-beside-pt2", "b-nul-name", "c-nested-model"),
        *("d-duplicate-last", "opaque-object", "custom-object", "aotinductor"),
        *("placeholder-name", "enum-loads-library", "factory-import", "shape-expression"),
    ],
)
def test_the_guard_alone_stops_each_path(craft, marker, name):
    """torch.export.load under `guarded`, without the archive check, runs nothing.

    (Of two duplicate members torch may read the harmless one: those are left to
    `check_archive`, which refuses them all.)
    """
    path = craft(name)
    with pytest.raises((UnsafeInputError, FormatError)), guarded(path):
        _unguarded_load(path)
    assert not marker.exists()


def test_the_guard_stops_full_unpickles_libraries_and_processes(tmp_path, marker):
    payload = pickle.dumps(Payload(marker))
    attempts = [
        lambda: pickle.Unpickler(io.BytesIO(payload)).load(),
        lambda: ctypes.CDLL(None),
        lambda: subprocess.run(["true"], check=False),
        lambda: torch.load(io.BytesIO(pickled(Payload(marker))), weights_only=False),
    ]
    for attempt in attempts:
        with pytest.raises(UnsafeInputError), guarded(tmp_path / "x.pt2"):
            attempt()
    assert not marker.exists()


def test_the_guard_restores_torch_and_leaves_other_threads_alone(craft, tmp_path):
    before = (torch.load, pickle.loads, sympy.sympify, torch.fx.Graph.python_code)
    with pytest.raises(UnsafeInputError):
        load_model(craft("pickled-weight"))
    assert (torch.load, pickle.loads, sympy.sympify, torch.fx.Graph.python_code) == before
    results = []

    def other_thread():  # a full unpickle, which the guarded thread may not do
        results.append(pickle.loads(pickle.dumps(OrderedDict(a=1))))

    with guarded(tmp_path / "x.pt2"):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert results == [OrderedDict(a=1)]


def test_a_refusal_torch_swallows_is_still_reported(tmp_path):
    refused = pytest.raises(UnsafeInputError, match="unpickle more than weights")
    with refused, guarded(tmp_path / "x.pt2"), contextlib.suppress(Exception):
        torch.load(io.BytesIO(pickled(OrderedDict(a=Payload(tmp_path / "m")))))


def test_unlift_checks_the_guards_it_compiles(saved, tmp_path, marker):
    path = write(tmp_path / "net.pt2", archive_members(saved["dynamic"]))
    with load_model(path) as model:
        model.module._guards_code = [f"open({str(marker)!r}, 'w') is not None"]
        with pytest.raises(UnsafeInputError, match="input guard"):
            unlift(model.module, path)
    assert not marker.exists()


@pytest.mark.parametrize("program", ["plain", "dynamic", "branch"])
@pytest.mark.parametrize("trust", [False, True])
def test_real_programs_load_and_run(saved, tmp_path, program, trust):
    path = write(tmp_path / "net.pt2", archive_members(saved[program]))
    assert detect_format(path) is ModelFormat.EXPORT
    example = {"plain": torch.randn(2, 4), "dynamic": torch.randn(6, 4), "branch": torch.randn(3)}
    with load_model(path, trust_pickle=trust) as model:
        example = example[program]
        expected = model.module.module()(example)
        assert torch.equal(unlift(model.module, path)(example), expected)
        if program != "branch":
            assert model.names() == ["linear.weight", "linear.bias", "shift", "scale"]


def test_members_with_data_descriptors_load(saved, tmp_path):
    """zipfile writing to a stream it cannot seek marks every member with a descriptor."""

    class Unseekable(io.RawIOBase):
        def __init__(self, file):
            self.file = file

        def writable(self):
            return True

        def write(self, data):
            return self.file.write(data)

    path = tmp_path / "net.pt2"
    with open(path, "wb") as file, zipfile.ZipFile(Unseekable(file), "w") as archive:
        for name, data in archive_members(saved["plain"]):
            archive.writestr(name, data)
    with zipfile.ZipFile(path) as archive:
        assert all(info.flag_bits & 0x8 for info in archive.infolist())
    with load_model(path) as model:
        assert len(model) == 4


def test_compressed_members_are_refused_as_not_torch_written(saved, tmp_path):
    path = write(
        tmp_path / "net.pt2", archive_members(saved["plain"]), compression=zipfile.ZIP_DEFLATED
    )
    with pytest.raises(FormatError, match="compressed member"):
        load_model(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({f"{ROOT}/archive_format": b"pt3"}, "not a torch.export program"),
        ({MODEL: None}, "without a program"),
        ({f"{ROOT}/data/weights/weight_0": None}, "corrupt torch.export archive"),
    ],
    ids=["format-marker", "no-program", "missing-weights"],
)
def test_inconsistent_archives_are_corrupt(saved, tmp_path, edit, message):
    members = [(n, edit.get(n, d)) for n, d in archive_members(saved["plain"]) if edit.get(n, d)]
    path = write(tmp_path / "net.pt2", members)
    with pytest.raises(FormatError, match=message) as caught:
        load_model(path)
    assert caught.value.exit_code == EXIT_RUNTIME


def test_truncated_archives_are_truncated_export_archives(saved, tmp_path):
    data = saved["plain"]
    # From the middle of the payloads to just short of the end; near the end, zipfile
    # finds the torch.save archive of the sample inputs stored inside.
    for cut in range(len(data) // 2, len(data), max(1, len(data) // 40)):
        path = tmp_path / "cut.pt2"
        path.write_bytes(data[:cut])
        for call in (detect_format, load_model):
            with pytest.raises(FormatError, match=r"truncated or corrupt torch\.export archive"):
                call(path)


# ------------------------------------------------------------------------ CLI


@pytest.mark.parametrize(
    "name",
    [
        *("a-legacy-fallback", "b-nul-name", "c-nested-model", "d-duplicate-last"),
        *("placeholder-name", "shape-expression"),
    ],
)
def test_the_cli_refuses_with_exit_3_and_writes_nothing(craft, marker, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    path = craft(name)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke("convert", path)
    assert result.exit_code == EXIT_UNSAFE, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "unsafe torch.export archive" in errors[0]
    assert "--trust-pickle" in flat(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not marker.exists()


def test_the_cli_converts_a_real_program_the_same_trusted_or_not(saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "net.pt2", archive_members(saved["dynamic"]))
    outputs = {}
    for flags in ([], ["--trust-pickle"]):
        out = tmp_path / f"net{len(flags)}.bnn.safetensors"
        result = invoke("convert", path, "-o", out, "--seed", "3", *flags)
        assert result.exit_code == 0, result.output
        outputs[len(flags)] = load_file(out)
    assert outputs[0].keys() == outputs[1].keys()
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])


def test_the_cli_reports_a_truncated_archive(saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "cut.pt2"
    path.write_bytes(saved["plain"][: len(saved["plain"]) - 30])
    result = invoke("convert", path)
    assert result.exit_code == EXIT_RUNTIME
    assert "truncated or corrupt torch.export archive" in flat(result.stderr)


@pytest.mark.skipif(not BNNIFY.exists(), reason="the bnnify console script is not installed")
def test_torch_logs_no_traceback_for_a_corrupt_archive(saved, tmp_path):
    """torch.export.load logs a traceback when load_pt2 fails; bnnify keeps it off stderr."""
    weight = f"{ROOT}/data/weights/weight_0"
    path = write(
        tmp_path / "net.pt2", [m for m in archive_members(saved["plain"]) if m[0] != weight]
    )
    done = subprocess.run(
        [str(BNNIFY), "convert", str(path)],
        cwd=tmp_path,
        env={**os.environ, "NO_COLOR": "1"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == EXIT_RUNTIME, done.stderr
    assert "Traceback" not in done.stderr and "Ran into the following error" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("Error:")] != []
