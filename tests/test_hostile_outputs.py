"""Hostile outputs: no input replaced, no output half-written or clobbered, nothing left.

A corpus of crafted cases run through the real entry point. Each asserts the exit code,
a one-line `Error:` message, that no payload ran (a marker file), that no input changed
(hashes before and after) and that nothing is left behind (no temporary file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke
from fit_files import shared_fit_files, subprocess_env, toy_regression
from model_files import build_mlp, save_sharded
from safetensors import safe_open
from safetensors.torch import save_file

from bnnify.formats import safetensors_io

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

# Raw control bytes that must never reach a terminal (newline and tab aside).
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
HOSTILE = "\x1b[31mred\x1b]8;;http://evil.example\x07link\x1b]8;;\x07\x07bell\rcr\x00nul"


def digests(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file under `paths` (files or folders)."""
    files: list[Path] = []
    for path in paths:
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


def one_error(stderr: str, *fragments: str) -> str:
    """The one `Error:` line of `stderr` (and no traceback), holding `fragments`."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, stderr)
    return lines[0]


def refused(args: list, inputs: list[Path], folder: Path, code: int, *fragments: str):
    """Runs `bnnify ARGS`, expecting `code` and an error; inputs unchanged, nothing left."""
    before = digests(*inputs)
    result = invoke(*args)
    assert result.exit_code == code, result.output
    one_error(result.stderr, *fragments)
    assert digests(*inputs) == before
    assert leftovers(folder) == []
    return result


@pytest.fixture
def models(tmp_path, monkeypatch):
    """`model/model.safetensors`, a sharded `sharded/`, a spec and links, in the cwd."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    tensors = {"fc.weight": torch.randn(8, 4), "fc.bias": torch.randn(8)}
    save_file(tensors, str(tmp_path / "model" / "model.safetensors"))
    save_sharded(build_mlp(), tmp_path / "sharded", shards=3)
    (tmp_path / "spec.yaml").write_text("prior: gaussian\n")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "model" / "model.safetensors")
    os.link(tmp_path / "model" / "model.safetensors", tmp_path / "hard.safetensors")
    return tmp_path


# case -> the model argument and the other arguments of `bnnify convert`
CONVERT_ONTO_INPUTS = {
    "folder, -o its file": ("model", "-o model/model.safetensors"),
    "folder, --report its file": ("model", "-o o.bnn.safetensors --report model/model.safetensors"),
    "sharded folder, its index": ("sharded", "-o sharded/model.safetensors"),
    "sharded index, --report a shard": (
        "sharded/model.safetensors.index.json",
        "-o o.bnn.safetensors --report sharded/model-00002-of-00003.safetensors",
    ),
    "the spec": ("model", "--spec spec.yaml -o spec.yaml"),
    "a symbolic link to the model": ("model/model.safetensors", "-o link.safetensors"),
    "a hard link to the model": ("model/model.safetensors", "-o hard.safetensors"),
}


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["", "force"])
@pytest.mark.parametrize("case", CONVERT_ONTO_INPUTS)
def test_convert_never_writes_onto_what_it_reads(models, case, force):
    source, rest = CONVERT_ONTO_INPUTS[case]
    inputs = [models / "model", models / "sharded", models / "spec.yaml"]
    args = ["convert", source, *rest.split(), *force]
    refused(args, inputs, models, 2, "would overwrite the input")


@pytest.fixture
def fit_inputs(tmp_path_factory, tmp_path, monkeypatch):
    """Copies of a model, its checkpoint and data; a sharded checkpoint; in the cwd."""
    files = shared_fit_files(tmp_path_factory)
    for name in ("reg_model", "reg_ckpt", "reg_train"):
        shutil.copy(getattr(files, name), tmp_path)
    shutil.copy(files.reg_train, tmp_path / "val.safetensors")
    monkeypatch.chdir(tmp_path)
    save_sharded(build_mlp(), tmp_path / "sharded", shards=3)
    converted = invoke("convert", "sharded", "-o", "ck.safetensors", "-q")
    assert converted.exit_code == 0, converted.output
    return tmp_path


FIT = "fit toy.bnn.safetensors -m toy.script.pt -d toy.train.safetensors --task regression"
PREDICT = "predict toy.bnn.safetensors -m toy.script.pt -i toy.train.safetensors"
OTHER_ONTO_INPUTS = {
    "fit --val V -o V": f"{FIT} --val val.safetensors -o val.safetensors",
    "fit -o its data": f"{FIT} -o toy.train.safetensors",
    "fit -o its model": f"{FIT} -o toy.script.pt",
    "fit -o its checkpoint": f"{FIT} -o toy.bnn.safetensors",
    "predict --targets T -o T": f"{PREDICT} --targets val.safetensors -o val.safetensors",
    "predict -o its input": f"{PREDICT} -o toy.train.safetensors",
    "kl of an index --out its shard": (
        "kl ck.safetensors.index.json --out ck-00001-of-00003.safetensors"
    ),
}


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["", "force"])
@pytest.mark.parametrize("case", OTHER_ONTO_INPUTS)
def test_fit_predict_and_kl_never_write_onto_what_they_read(fit_inputs, case, force):
    args = [*OTHER_ONTO_INPUTS[case].split(), *force]
    refused(args, [fit_inputs], fit_inputs, 2, "would overwrite the input")


# The harness: convert in-process (signal handlers as in `main`), sending itself `first`
# at the third tensor written and `second` after `after` more Python events (opcodes),
# at the next point where CPython runs signal handlers (after a call, at a function's
# start, on a backward jump), so that the second signal lands at many exact points of
# the interrupt's cleanup.
INTERRUPTED_CONVERSIONS = r"""
import dis, json, os, sys
from bnnify.cli.main import app
from bnnify.formats import safetensors_io
from bnnify.formats.interrupts import install_signal_handlers

install_signal_handlers()
plan = json.loads(sys.argv[1])
real_write = safetensors_io.SafetensorsWriter.write
BREAKERS = {"CALL", "CALL_FUNCTION_EX", "JUMP_BACKWARD", "RESUME"}
points = {}


def handler_point(frame):
    code = frame.f_code
    if code not in points:
        instructions = list(dis.get_instructions(code))
        points[code] = {
            i.offset for p, i in zip(instructions, instructions[1:]) if p.opname in BREAKERS
        }
    return frame.f_lasti in points[code]


codes = []
for i, (first, second, after) in enumerate(plan):
    state = {"writes": 0, "left": None}

    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        if state["left"] is not None:
            state["left"] -= 1
            if state["left"] < 0 and event == "opcode" and handler_point(frame):
                state["left"] = None
                sys.settrace(None)
                os.kill(os.getpid(), second)
        return tracer

    def write(self, name, tensor):
        state["writes"] += 1
        if state["writes"] == 3:
            if second:
                state["left"] = after
                sys.settrace(tracer)
            os.kill(os.getpid(), first)
        return real_write(self, name, tensor)

    safetensors_io.SafetensorsWriter.write = write
    try:
        app(["convert", "model", "-o", f"out{i}.bnn.safetensors", "-q"])
    except SystemExit as exit:
        codes.append(exit.code)
    finally:
        sys.settrace(None)
print(json.dumps(codes))
"""


def test_a_second_signal_during_cleanup_leaves_nothing(tmp_path):
    (tmp_path / "model").mkdir()
    tensors = {f"layer{i}.weight": torch.randn(256, 256) for i in range(4)}
    save_file(tensors, str(tmp_path / "model" / "model.safetensors"))
    before = digests(tmp_path / "model")
    sigint, sigterm, sighup = signal.SIGINT, signal.SIGTERM, signal.SIGHUP
    plan = [[sigint, sigint, after] for after in (0, 1, 3, 10, 40, 150, 600, 2500)]
    plan += [[sigterm, sighup, 25], [sighup, sigint, 200], [sighup, 0, 0], [sigterm, 0, 0]]
    child = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_CONVERSIONS, json.dumps(plan)],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == [130] * len(plan), child.stderr
    assert "Traceback" not in child.stderr and "Aborted" not in child.stderr
    assert child.stderr.count("Interrupted") == len(plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert digests(tmp_path / "model") == before


@pytest.mark.parametrize(
    ("code", "words"), [(28, "no space left on device"), (27, "file too large")]
)
def test_a_full_disk_or_a_size_limit_is_a_clean_error(models, monkeypatch, code, words):
    real = safetensors_io.SafetensorsWriter.write
    calls = []

    def write(self, name, tensor):
        calls.append(name)
        if len(calls) == 2:
            raise OSError(code, os.strerror(code))
        return real(self, name, tensor)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", write)
    args = ["convert", "model", "-o", "out.bnn.safetensors", "--force"]
    refused(args, [models / "model"], models, 1, "cannot write", "out.bnn.safetensors", words)
    assert not (models / "out.bnn.safetensors").exists()


def test_a_full_disk_at_the_final_sync_is_a_clean_error(fit_inputs, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    args = [*PREDICT.split(), "--samples", "2", "-o", "p.safetensors"]
    refused(args, [fit_inputs], fit_inputs, 1, "cannot write", "p.safetensors", "no space")
    assert not (fit_inputs / "p.safetensors").exists()


def test_a_name_too_long_is_refused_before_any_work(models):
    name = "x" * 300 + ".safetensors"
    refused(["convert", "model", "-o", name], [models / "model"], models, 2, "bytes long")


def test_an_unwritable_folder_is_refused_before_any_work(models):
    if os.geteuid() == 0:
        # Root writes anywhere a mode allows nothing; sysfs refuses new files even to root.
        folder = Path("/sys")
    else:
        folder = models / "read_only"
        folder.mkdir(mode=0o555)
    args = ["convert", "model", "-o", folder / "out.bnn.safetensors", "--report", "r.safetensors"]
    refused(args, [models / "model"], models, 2, "not writable", str(folder))
    assert not (models / "r.safetensors").exists()


def test_a_diverging_fit_writes_nothing(fit_inputs):
    args = [*FIT.split(), "--epochs", "3", "--lr", "1e30", "-o", "fit.safetensors"]
    result = refused(args, [fit_inputs], fit_inputs, 1, "training diverged")
    assert "--lr" in result.stderr
    assert not (fit_inputs / "fit.safetensors").exists()


def test_data_that_overflow_the_model_are_refused(fit_inputs):
    x, y = toy_regression(64, seed=3)
    save_file({"x": x / 5 * 3e38, "y": y}, str(fit_inputs / "huge.safetensors"))  # |x| <= 3e38
    args = [*FIT.split(), "-d", "huge.safetensors", "--epochs", "1", "-o", "fit.safetensors"]
    result = refused(args, [fit_inputs], fit_inputs, 1, "huge.safetensors", "too large")
    assert "Standardise" in result.stderr
    assert not (fit_inputs / "fit.safetensors").exists()


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PAYLOAD_RAN"


def test_a_spec_cannot_run_a_shell_command(models, marker):
    torch.save({"w": torch.randn(2, 2)}, models / "weights.pt")
    (models / "evil.yaml").write_text(
        f'arch: "os:system"\narch_kwargs: {{command: "touch {marker}"}}\n'
    )
    base = ["convert", "weights.pt", "--spec", "evil.yaml", "-o", "o.bnn.safetensors"]
    for extra in ([], ["--arch", "os:system"], ["--arch", "os:system", "--arch-kwargs", "{}"]):
        result = refused([*base, *extra], [models / "weights.pt"], models, 3, "os:system")
        assert "--arch-kwargs" in result.stderr
    assert not marker.exists()


def test_a_spec_cannot_import_a_module_unconfirmed(models, marker, monkeypatch):
    (models / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\nbuild = None\n")
    monkeypatch.syspath_prepend(str(models))
    torch.save({"w": torch.randn(2, 2)}, models / "weights.pt")
    (models / "evil.yaml").write_text('arch: "evilmod:build"\n')
    args = ["convert", "weights.pt", "--spec", "evil.yaml", "-o", "o.bnn.safetensors"]
    refused(args, [models / "weights.pt"], models, 3, "evilmod:build")
    refused([*args, "--arch", "other:build"], [models / "weights.pt"], models, 3, "other:build")
    assert not marker.exists() and "evilmod" not in sys.modules


def test_a_checkpoint_cannot_choose_the_arch_kwargs(models, marker):
    """`--arch` alone no longer confirms the arguments recorded in a checkpoint."""
    torch.save({"w": torch.randn(2, 2)}, models / "weights.pt")
    made = invoke("convert", "weights.pt", "-o", "w.bnn.safetensors", "-q")
    assert made.exit_code == 0, made.output
    rewrite_metadata(
        models / "w.bnn.safetensors",
        lambda meta: {
            **meta,
            "bnnify.spec": json.dumps(
                {
                    **json.loads(meta["bnnify.spec"]),
                    "arch": "os:system",
                    "arch_kwargs": {"command": f"touch {marker}"},
                }
            ),
        },
    )
    save_file({"x": torch.randn(3, 2)}, str(models / "x.safetensors"))
    args = ["predict", "w.bnn.safetensors", "-m", "weights.pt", "-i", "x.safetensors"]
    refused([*args, "--arch", "os:system"], [models], models, 3, "os:system")
    assert not marker.exists()


def rewrite_metadata(path: Path, change) -> None:
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata=change(metadata))


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """A model whose tensor names and file name hold escape sequences, and its checkpoint."""
    monkeypatch.chdir(tmp_path)
    source = tmp_path / f"m{HOSTILE.replace(chr(0), '').replace('/', '')}.safetensors"
    save_file({f"{HOSTILE}.weight": torch.randn(4, 3), "ok": torch.randn(3)}, str(source))
    converted = invoke("convert", source, "-o", "h.bnn.safetensors", "--json")
    assert converted.exit_code == 0, converted.output
    assert json.loads(converted.stdout)["parameters"][0]["name"] == f"{HOSTILE}.weight"
    return source


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "{source}", "-o", "v.bnn.safetensors", "-v"],
        ["inspect", "h.bnn.safetensors"],
        ["kl", "h.bnn.safetensors"],
        ["kl", "h.kl.safetensors"],
        ["inspect", "{source}"],
    ],
    ids=["convert -v", "inspect", "kl", "kl report", "inspect error"],
)
def test_names_from_files_reach_the_terminal_escaped(hostile, args):
    result = invoke(*[str(hostile) if a == "{source}" else a for a in args])
    assert not CONTROL.search(result.stdout + result.stderr), repr(result.output)
    assert "\\x1b[31mred" in result.stdout + result.stderr


def test_a_hostile_recorded_source_is_escaped_in_errors(hostile, tmp_path):
    rewrite_metadata(
        tmp_path / "h.bnn.safetensors",
        lambda meta: {
            **meta,
            "bnnify.source": json.dumps({"name": HOSTILE, "format": "x", "sha256": HOSTILE}),
        },
    )
    save_file({"x": torch.randn(3, 3)}, str(tmp_path / "x.safetensors"))
    args = ["predict", "h.bnn.safetensors", "-m", hostile, "-i", "x.safetensors"]
    result = refused(args, [tmp_path], tmp_path, 1, "does not match the checkpoint")
    assert not CONTROL.search(result.stdout + result.stderr), repr(result.output)
    inspected = invoke("inspect", "h.bnn.safetensors", "--json")
    assert json.loads(inspected.stdout)["source"]["sha256"] == HOSTILE


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_corrupt_export_archive_prints_no_traceback(tmp_path, monkeypatch):
    """torch logs a traceback through its own stderr handlers: no record may be made."""
    with zipfile.ZipFile(tmp_path / "bad.pt2", "w") as archive:
        archive.writestr("bad/archive_format", b"pt2")
        archive.writestr("bad/models/model.json", b'{"garbage": true}')
        archive.writestr("bad/version", b"not a version")
    monkeypatch.chdir(tmp_path)
    records = Records()
    logging.getLogger("torch.export").addHandler(records)
    try:
        args = ["convert", "bad.pt2", "-o", "o.bnn.safetensors"]
        result = refused(args, [], tmp_path, 1, "bad.pt2")
        assert records.records == []
        # torch itself logs a traceback on this archive (so the check above can fail).
        with contextlib.suppress(Exception), open(tmp_path / "bad.pt2", "rb") as stream:
            torch.export.load(stream)
        assert records.records and records.records[0].exc_info
    finally:
        logging.getLogger("torch.export").removeHandler(records)
    assert result.stderr.startswith("Error:"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt2"]
