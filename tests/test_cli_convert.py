"""Tests of `bnnify convert`: every format through the real entry point, errors, files, modes."""

from __future__ import annotations

import filecmp
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import BNNIFY, flat, invoke
from model_files import FORMATS, save_pickled, save_state_dict, shared_files
from safetensors.torch import save_file

from bnnify.cli.schemas import KL_BLOCK, SCHEMAS
from bnnify.formats import safetensors_io
from bnnify.formats.checkpoint import Checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

SAMPLES = Path(__file__).resolve().parent.parent / "sample_configs"


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return shared_files(tmp_path_factory)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Default outputs go to the working directory: make it the test's folder."""
    monkeypatch.chdir(tmp_path)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def library_kl(checkpoint: Path) -> float:
    with Checkpoint(checkpoint) as ckpt, torch.no_grad():
        return float(ckpt.to_bayesian().kl_divergence())


def run_process(args, cwd, env=None, **kwargs):
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        **kwargs,
    )


# ------------------------------------------------------------------ every format


@pytest.mark.parametrize(
    ("model", "fmt"),
    [(m, f) for m in ("mlp", "cnn", "lstm") for f in FORMATS if (m, f) != ("lstm", "pickled")],
)
def test_every_format_converts_through_the_cli(models, tmp_path, model, fmt):
    path = models.path(model, fmt)
    trust = ["--trust-pickle"] if fmt == "pickled" else []
    result = invoke("convert", path, "--json", *trust)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    module = models.modules[model]
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    assert data["source"]["format"] == FORMATS[fmt]
    assert data["source"]["name"] == path.name
    assert data["reparametrized"] == len(params) == len(data["parameters"])
    assert sorted(data["deterministic"]) == sorted(buffers)
    assert data["variational_elements"] == sum(p.numel() for p in params.values())
    for row in data["parameters"]:
        assert row["shape"] == list(params[row["name"]].shape)
        assert row["elements"] == params[row["name"]].numel()
        assert row["dtype"] == "float32"
    assert data["kl"]["method"] == "analytic" and data["kl"]["samples"] is None
    assert data["kl"]["sum"] == pytest.approx(math.fsum(p["kl"] for p in data["parameters"]))
    assert data["kl"]["mean"] == pytest.approx(data["kl"]["sum"] / data["variational_elements"])
    # Default outputs, in the working directory, named after the input.
    outputs = [Path(p) for p in data["outputs"]]
    # The stem is the file name without its last extension (the folder's name if sharded).
    stem = "model" if fmt == "sharded" else path.name.rsplit(".", 1)[0]
    if fmt == "sharded":
        assert outputs[-2].name == f"{stem}.bnn.safetensors.index.json"
        assert len(outputs) > 3
    else:
        assert [p.name for p in outputs] == [f"{stem}.bnn.safetensors", f"{stem}.kl.safetensors"]
    assert listing(tmp_path) == sorted(p.name for p in outputs)
    assert library_kl(outputs[-2]) == pytest.approx(data["kl"]["sum"], rel=1e-5)


def test_sharded_input_gives_sharded_output_equal_to_the_single_file(models, tmp_path):
    single = json.loads(invoke("convert", models.path("cnn", "safetensors"), "--json").stdout)
    sharded = json.loads(
        invoke("convert", models.path("cnn", "sharded"), "-o", "s.bnn.safetensors", "--json").stdout
    )
    shards = sorted(tmp_path.glob("s.bnn-0000*-of-*.safetensors"))
    names = [Path(p).name for p in sharded["outputs"]]
    assert names == [
        *(s.name for s in shards),
        "s.bnn.safetensors.index.json",
        "s.kl.safetensors",
    ]
    assert len(shards) >= 2
    with Checkpoint(single["outputs"][0]) as one, Checkpoint(sharded["outputs"][-2]) as many:
        for key in one.files:
            assert torch.equal(one.tensor(key), many.tensor(key)), key
    assert sharded["kl"]["sum"] == single["kl"]["sum"]


def test_an_explicit_shard_size(models, tmp_path):
    data = json.loads(
        invoke(
            "convert", models.path("lstm", "safetensors"), "--shard-size", "1KB", "--json"
        ).stdout
    )
    index = Path(data["outputs"][-2])
    assert index.name == "lstm.bnn.safetensors.index.json"
    with Checkpoint(index) as ckpt:
        assert len(set(ckpt.files.values())) == len(data["outputs"]) - 2 >= 2


def test_the_same_input_and_seed_give_identical_files(models, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        args = ["--posterior", "gaussian", "--seed", "11", "-q"]
        out = [
            "-o",
            f"{folder}/m.bnn.safetensors",
            "--report",
            f"{folder}/m.kl.safetensors",
        ]
        assert invoke("convert", models.path("mlp", "export"), *args, *out).exit_code == 0
    for name in ("m.bnn.safetensors", "m.kl.safetensors"):
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False)


def test_spec_flags_reach_the_checkpoint(models, tmp_path):
    data = json.loads(
        invoke(
            "convert",
            models.path("mlp", "safetensors"),
            "--posterior-arg",
            "sigma=0.05",
            "--prior",
            "laplace",
            "--prior-arg",
            "scale=0.5",
            "--dtype",
            "float64",
            "--exclude",
            "*.bias",
            "--seed",
            "4",
            "--json",
        ).stdout
    )
    assert data["spec"]["posterior"] == {"name": "pretrained_gaussian", "kwargs": {"sigma": 0.05}}
    assert data["spec"]["prior"] == {"name": "laplace", "kwargs": {"scale": 0.5}}
    assert (data["spec"]["dtype"], data["spec"]["seed"]) == ("float64", 4)
    assert [p["name"] for p in data["parameters"]] == ["0.weight", "2.weight"]
    assert data["deterministic"] == ["0.bias", "2.bias"]
    for row in data["parameters"]:
        assert row["sigma_init"] == pytest.approx(0.05)
        assert row["dtype"] == "float64"
    with Checkpoint(data["outputs"][0]) as ckpt:
        assert ckpt.spec.prior == ("laplace", {"scale": 0.5})
        assert ckpt.tensor("0.bias").dtype == torch.float64
    assert library_kl(Path(data["outputs"][0])) == pytest.approx(data["kl"]["sum"], rel=1e-10)


def test_a_prior_without_closed_form_uses_monte_carlo(models, tmp_path):
    data = json.loads(
        invoke(
            "convert",
            models.path("mlp", "safetensors"),
            "--spec",
            SAMPLES / "scale_mixture.yaml",
            "--json",
        ).stdout
    )
    assert (data["kl"]["method"], data["kl"]["samples"]) == ("monte_carlo", 16)
    data = json.loads(
        invoke(
            "convert",
            models.path("mlp", "safetensors"),
            "--mc-samples",
            "8",
            "-o",
            "b.bnn.safetensors",
            "--report",
            "b.kl.safetensors",
            "--json",
        ).stdout
    )
    assert (data["kl"]["method"], data["kl"]["samples"]) == ("monte_carlo", 8)


def test_a_pickled_module_needs_trust(models, tmp_path):
    path = save_pickled(models.modules["mlp"], tmp_path / "whole.pt")
    refused = invoke("convert", path)
    assert refused.exit_code == 3
    assert "--trust-pickle" in flat(refused.stderr)
    assert listing(tmp_path) == ["whole.pt"]
    trusted = invoke("convert", path, "--trust-pickle", "-q")
    assert trusted.exit_code == 0, trusted.output
    assert listing(tmp_path) == ["whole.bnn.safetensors", "whole.kl.safetensors", "whole.pt"]


# ------------------------------------------------------------------------ errors


@pytest.fixture
def inputs(models, tmp_path):
    """Input files in the test's folder, by name."""
    files = {
        "state": save_state_dict(models.modules["mlp"], tmp_path / "state.pt"),
        "script": tmp_path / "script.pt",
        "empty": tmp_path / "empty.pt",
        "garbage": tmp_path / "garbage.pt",
        "pickled": save_pickled(models.modules["mlp"], tmp_path / "pickled.pt"),
        "bad_key": tmp_path / "bad_key.yaml",
        "duplicate": tmp_path / "duplicate.yaml",
        "no_module": tmp_path / "no_module.yaml",
    }
    files["script"].write_bytes(models.path("mlp", "torchscript").read_bytes())
    files["empty"].write_bytes(b"")
    files["garbage"].write_bytes(b"\x00\x01 not a model at all " * 10)
    files["bad_key"].write_text("prior: gaussian\nsed: 3\n")
    files["duplicate"].write_text("prior: gaussian\nseed: 1\nprior: laplace\n")
    files["no_module"].write_text("arch: 'bnnify_no_such_package.models:build'\n")
    return files


ARCH = SAMPLES / "state_dict_arch.yaml"
# Confirms the arch of ARCH (braces doubled: the arguments go through str.format).
CONFIRM = ["--arch", "bnnify.demo:build_model", "--arch-kwargs"]
CONFIRM += ['{{"hidden": 32, "in_features": 8, "out_features": 1}}']
ERRORS = {
    "missing file": (["{missing}"], 1, ["does not exist", "missing.pt"]),
    "empty file": (["{empty}"], 1, ["empty.pt' is empty", "Supported formats"]),
    "garbage file": (["{garbage}"], 1, ["not a model file bnnify can read"]),
    "pickle without trust": (["{pickled}"], 3, ["pickled Python object", "--trust-pickle"]),
    "unknown prior": (
        ["{state}", "--prior", "gausian"],
        2,
        ["unknown prior 'gausian'", "Did you mean 'gaussian'?", "empirical_gaussian, gaussian"],
    ),
    "unknown posterior": (
        ["{state}", "--posterior", "pretrained"],
        2,
        ["unknown posterior 'pretrained'", "pretrained_gaussian"],
    ),
    "negative sigma": (["{state}", "--prior-arg", "sigma=-1"], 2, ["sigma must be > 0"]),
    "argument without value": (["{state}", "--prior-arg", "sigma"], 2, ["missing '='"]),
    "unknown spec key": (
        ["{state}", "--spec", "{bad_key}"],
        2,
        ["unknown key 'sed'", "Did you mean 'seed'?"],
    ),
    "duplicate spec key": (
        ["{state}", "--spec", "{duplicate}"],
        2,
        ["duplicate key 'prior'", "line 3"],
    ),
    "missing spec": (["{state}", "--spec", "{missing}"], 2, ["spec file not found"]),
    "unavailable device": (["{state}", "--device", "cuda"], 2, ["'cuda' is not available"]),
    "unknown dtype": (["{state}", "--dtype", "float8"], 2, ["float8"]),
    "arch for torchscript": (
        ["{script}", "--spec", str(ARCH)],
        2,
        ["arch applies to state dicts", "torchscript"],
    ),
    "arch not importable": (
        ["{state}", "--spec", "{no_module}", "--arch", "bnnify_no_such_package.models:build"],
        2,
        ["cannot import module 'bnnify_no_such_package.models'"],
    ),
    "state dict not matching the arch": (
        ["{state}", "--spec", str(ARCH), *CONFIRM],
        1,
        ["does not match arch", "missing: 1.bias", "unexpected: 2.bias, 2.weight"],
    ),
    "include matching nothing": (
        ["{state}", "--include", "decoder.*"],
        2,
        ["no tensor to reparametrize", "0.weight"],
    ),
    "bad shard size": (["{state}", "--shard-size", "0.5B"], 2, ["'0.5B' is not a size", "MiB"]),
    "output folder missing": (
        ["{state}", "-o", "nowhere/out.bnn.safetensors"],
        2,
        ["folder", "does not exist"],
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_inputs_fail_cleanly(inputs, tmp_path, case):
    args, code, fragments = ERRORS[case]
    names = {k: str(v) for k, v in inputs.items()} | {"missing": str(tmp_path / "missing.pt")}
    before = listing(tmp_path)
    hashes = {name: digest(path) for name, path in inputs.items()}
    result = invoke("convert", *(a.format(**names) for a in args))
    assert result.exit_code == code, result.output
    message = flat(result.stderr)
    if code != 2 or case not in ("unknown dtype",):
        assert message.startswith(("Error:", "Loaded")), message
    for fragment in fragments:
        assert fragment in message
    assert result.stdout == ""
    assert listing(tmp_path) == before
    assert {name: digest(path) for name, path in inputs.items()} == hashes


# ------------------------------------------------------------- files and signals


def test_an_existing_output_is_replaced_only_with_force(models, tmp_path):
    source = tmp_path / "m.pt"
    source.write_bytes(models.path("mlp", "state_dict").read_bytes())
    source_hash = digest(source)
    (tmp_path / "m.kl.safetensors").write_bytes(b"keep me")
    result = invoke("convert", source)
    assert result.exit_code == 2
    assert "already exists" in flat(result.stderr) and "--force" in flat(result.stderr)
    assert (tmp_path / "m.kl.safetensors").read_bytes() == b"keep me"
    assert listing(tmp_path) == ["m.kl.safetensors", "m.pt"]
    result = invoke("convert", source, "--force", "--json")
    assert result.exit_code == 0, result.output
    assert listing(tmp_path) == ["m.bnn.safetensors", "m.kl.safetensors", "m.pt"]
    assert json.loads(result.stdout)["kl"]["sum"] > 0
    again = invoke("convert", source, "--force", "--posterior", "gaussian")
    assert again.exit_code == 0
    assert digest(source) == source_hash


@pytest.mark.parametrize("option", ["-o", "--report"])
def test_an_output_equal_to_the_input_is_refused(models, tmp_path, option):
    source = tmp_path / "m.pt"
    source.write_bytes(models.path("mlp", "state_dict").read_bytes())
    before = digest(source)
    result = invoke("convert", source, option, "m.pt", "--force")
    assert result.exit_code == 2
    assert "would overwrite the input" in flat(result.stderr)
    assert digest(source) == before
    assert listing(tmp_path) == ["m.pt"]


def test_an_interrupted_conversion_exits_130_and_leaves_nothing(models, tmp_path, monkeypatch):
    calls = []
    original = safetensors_io.SafetensorsWriter.write

    def write(self, name, tensor):
        calls.append(name)
        if len(calls) == 4:
            raise KeyboardInterrupt
        original(self, name, tensor)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", write)
    result = invoke("convert", models.path("cnn", "torchscript"))
    assert result.exit_code == 130
    assert "Interrupted" in result.stderr
    assert len(calls) == 4
    assert listing(tmp_path) == []


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """A model that takes a moment to convert (about 16 MB of weights)."""
    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    generator = torch.Generator().manual_seed(0)
    save_file(
        {f"layer{i}.weight": torch.randn(1000, 1000, generator=generator) for i in range(4)},
        str(path),
    )
    return path


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_conversion_leaves_no_partial_file(big_model, tmp_path, signum):
    process = subprocess.Popen(
        [sys.executable, "-m", "bnnify", "convert", str(big_model)],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Restore the default SIGINT handling a non-interactive parent may have disabled.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = process.stderr.readline()  # "Loaded ...": the conversion starts now
        assert line.startswith("Loaded"), line
        # Stopped first, the conversion cannot finish before the signal is pending: it is
        # handled as soon as the process runs again, whatever the machine's load.
        process.send_signal(signal.SIGSTOP)
        process.send_signal(signum)
        process.send_signal(signal.SIGCONT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "Interrupted" in stderr and "Traceback" not in stderr
    assert stdout == ""
    assert listing(tmp_path) == []


# ------------------------------------------------------------------ output modes


def test_the_default_output_is_a_summary_with_logs_on_stderr(models, tmp_path):
    result = invoke("convert", models.path("cnn", "export"))
    assert result.exit_code == 0
    out = flat(result.stdout)
    assert "Converted cnn.pt2 (export): 6 parameters reparametrized (178 elements)" in out
    assert "3 kept deterministic" in out and "KL divergence:" in out and "analytic" in out
    assert "wrote cnn.bnn.safetensors" in out and "wrote cnn.kl.safetensors" in out
    assert flat(result.stderr).startswith("Loaded")
    assert "Loaded" not in out


def test_quiet_prints_nothing(models, tmp_path):
    result = invoke("convert", models.path("cnn", "export"), "-q")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")
    assert listing(tmp_path) == ["cnn.bnn.safetensors", "cnn.kl.safetensors"]


def test_verbose_adds_a_per_parameter_table(models, tmp_path):
    result = invoke("convert", models.path("lstm", "torchscript"), "-v", "--prior", "laplace")
    assert result.exit_code == 0
    header = next(line for line in result.stdout.splitlines() if "┃ name" in line)
    for column in ("name", "shape", "elements", "dtype", "sigma init", "KL"):
        assert column in header
    # The posterior and prior, the same on every row, are said once, above the table.
    assert "posterior pretrained_gaussian (delta=0.1), prior laplace" in flat(result.stdout)
    assert flat(result.stdout).count("pretrained_gaussian") == 1
    rows = [line for line in result.stdout.splitlines() if line.startswith("│ lstm.weight_hh_l0")]
    assert len(rows) == 1
    for cell in ("(20, 5)", "100", "float32"):
        assert cell in rows[0]


def test_json_is_one_document_and_nothing_else(models, tmp_path):
    result = invoke("convert", models.path("cnn", "state_dict"), "--json")
    assert result.stderr == ""
    data = json.loads(result.stdout)  # fails on anything but exactly one document
    assert next(iter(data)) == "schema" and data["schema"] == "bnnify.convert/1"
    assert set(data) == set(SCHEMAS["convert"])
    assert tuple(data["kl"]) == KL_BLOCK


# ---------------------------------------------------------------- real processes


def test_python_m_bnnify_converts(models, tmp_path):
    done = run_process(
        [sys.executable, "-m", "bnnify", "convert", models.path("cnn", "sharded"), "--json"],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["source"]["format"] == "sharded_safetensors"
    assert data["reparametrized"] == 6 and len(data["deterministic"]) == 3
    assert listing(tmp_path) == sorted(data["outputs"])
    assert data["outputs"][-2] == "model.bnn.safetensors.index.json"
    assert library_kl(tmp_path / data["outputs"][-2]) == pytest.approx(data["kl"]["sum"], rel=1e-5)


@pytest.mark.skipif(not BNNIFY.exists(), reason="the bnnify console script is not installed")
def test_the_console_script_without_color_or_progress_bar(models, tmp_path):
    done = run_process(
        [BNNIFY, "convert", models.path("lstm", "export"), "-v", "--prior", "empirical_gaussian"],
        cwd=tmp_path,
        env={"NO_COLOR": "1", "COLUMNS": "300"},  # long temporary paths: no wrapping
    )
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout + done.stderr
    assert "Reparametrized parameters" in done.stdout and "empirical_gaussian" in done.stdout
    # stderr is a pipe: the log line and no progress bar.
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        f"Loaded {models.path('lstm', 'export')} (export, 6 tensors)"
    ]
    assert listing(tmp_path) == ["lstm.bnn.safetensors", "lstm.kl.safetensors"]
