"""A corpus of crafted input files, each refused cleanly through the real CLI.

Every case asserts the exit code, one `Error:` line (and at most a `Hint:` line) on
stderr, that no input changed (hashes before and after) and that the output folder is
still empty. Files are built in `tmp_path`; the fit and predict cases reuse the
session's small fitted models (`fit_files`).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke
from fit_files import save_script, shared_fit_files, subprocess_env
from safetensors.torch import save_file
from torch import nn

from bnnify.formats.safetensors_io import load_file, read_header

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning"),
]


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    return shared_fit_files(tmp_path_factory)


@pytest.fixture(autouse=True)
def _guarded(tmp_path, monkeypatch):
    """Work in tmp_path; a read that blocks (a FIFO) fails the test instead of hanging it."""
    monkeypatch.chdir(tmp_path)

    def hung(*_):
        raise TimeoutError("bnnify blocked on an input")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def digests(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file under `paths` (links not followed, FIFOs not read)."""
    found = {}
    for root in paths:
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if path.is_symlink():
                found[str(path)] = "-> " + os.readlink(path)
            elif path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def refused(args: list, code: int, match: str, inputs: list[Path]) -> str:
    """Runs `bnnify ARGS` writing to ./out/, checks it fails cleanly; returns stderr."""
    out = Path("out")
    out.mkdir(exist_ok=True)
    before = digests(*inputs)
    result = invoke(*args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert result.exit_code == code, result.stderr
    assert len(errors) == 1 and match in errors[0], result.stderr
    assert lines[-1] == errors[0] or (lines[-1].startswith("Hint:") and lines[-2] == errors[0])
    assert len(result.stderr) < 2000, "values in messages must be truncated"
    assert digests(*inputs) == before
    assert list(out.iterdir()) == []
    return result.stderr


def convert_args(model: Path, *extra) -> list:
    return [
        "convert",
        model,
        "-o",
        "out/c.bnn.safetensors",
        "--report",
        "out/c.kl.safetensors",
        *extra,
    ]


def small_model(path: Path) -> Path:
    torch.manual_seed(0)
    save_file({"fc.weight": torch.randn(3, 2), "fc.bias": torch.randn(3)}, str(path))
    return path


def checkpoint(tmp_path: Path, shard_size: str | None = None) -> Path:
    tmp_path.mkdir(exist_ok=True)
    model = small_model(tmp_path / "model.safetensors")
    args = ["convert", model, "-o", tmp_path / "c.bnn.safetensors", "-q"]
    result = invoke(*args, *(["--shard-size", shard_size] if shard_size else []))
    assert result.exit_code == 0, result.stderr
    return tmp_path / ("c.bnn.safetensors.index.json" if shard_size else "c.bnn.safetensors")


# ---------------------------------------------------------------- shards outside the folder


def sharded(folder: Path) -> Path:
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(folder / "s1.safetensors"))
    save_file({"b": torch.ones(2)}, str(folder / "s2.safetensors"))
    index = folder / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    return index


def test_a_model_shard_linked_outside_its_folder_is_refused(tmp_path):
    index = sharded(tmp_path / "model")
    secret = small_model(tmp_path / "secret.safetensors")
    (tmp_path / "model/s2.safetensors").unlink()
    (tmp_path / "model/s2.safetensors").symlink_to(secret)
    refused(convert_args(index.parent), 3, "outside the index's folder", [tmp_path])


def test_a_checkpoint_shard_linked_outside_its_folder_is_refused(tmp_path):
    index = checkpoint(tmp_path / "ckpt", shard_size="100")
    shard = sorted(index.parent.glob("c.bnn-*.safetensors"))[0]
    moved = tmp_path / "elsewhere.safetensors"
    shard.rename(moved)
    shard.symlink_to(moved)
    for command in ("kl", "inspect"):
        refused([command, index], 3, "outside the index's folder", [tmp_path / "ckpt", moved])
    lexical = index.read_text().replace(shard.name, f"../{moved.name}")
    index.write_text(lexical)
    refused(["kl", index], 3, "outside its folder", [tmp_path / "ckpt"])


def test_shards_linked_within_the_indexs_own_folder_are_read(tmp_path):
    """The Hugging Face cache layout: the index and the shards link into one blob folder."""
    blobs = sharded(tmp_path / "blobs").parent
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in ("m.safetensors.index.json", "s1.safetensors", "s2.safetensors"):
        (snapshot / name).symlink_to(blobs / name)
    Path("out").mkdir()
    result = invoke(*convert_args(snapshot), "-q")
    assert result.exit_code == 0, result.stderr


# ------------------------------------------------------------------ decompression bombs


def set_declared_size(data: bytes, member: str, size: int) -> bytes:
    """The archive with `member`'s uncompressed size declared as `size` (no data added)."""
    data = bytearray(data)
    name = member.encode()
    central = data.index(b"PK\x01\x02" + data[data.index(b"PK\x01\x02") + 4 :][:0])
    while data[central + 46 : central + 46 + len(name)] != name:
        central = data.index(b"PK\x01\x02", central + 4)
    struct.pack_into("<L", data, central + 24, size)
    (local,) = struct.unpack_from("<L", data, central + 42)
    struct.pack_into("<L", data, local + 22, size)
    return bytes(data)


def rezip(source: Path, target: Path, compress: str = "") -> None:
    """Copies an archive, deflating the members whose name contains `compress`."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            method = zipfile.ZIP_DEFLATED if compress and compress in info.filename else 0
            new.writestr(info.filename, old.read(info), compress_type=method)


def test_a_compressed_torch_save_archive_is_refused(tmp_path):
    torch.save({"w": torch.zeros(4)}, tmp_path / "plain.pt")
    rezip(tmp_path / "plain.pt", tmp_path / "model.pt", compress="/")
    refused(convert_args(tmp_path / "model.pt"), 1, "is compressed", [tmp_path])


def test_an_archive_declaring_gigabytes_is_refused_before_inflating(tmp_path):
    script = save_script(nn.Linear(2, 1), tmp_path / "script.pt")
    code = next(n for n in zipfile.ZipFile(script).namelist() if n.endswith(".py"))
    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(set_declared_size(script.read_bytes(), code, 0xF0000000))
    refused(convert_args(bomb), 1, "decompression bomb", [tmp_path])


def test_an_npz_bomb_is_refused(fitted, tmp_path):
    import numpy as np

    np.savez_compressed(tmp_path / "zeros.npz", x=np.zeros(10_000_000), y=np.zeros(10_000_000))
    assert (tmp_path / "zeros.npz").stat().st_size < 1_000_000
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000,), }"
    lying = b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + header.ljust(117).encode() + b"\n"
    with zipfile.ZipFile(tmp_path / "lying.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", lying + bytes(64))
    for data in ("zeros.npz", "lying.npz"):
        args = ["predict", fitted.reg_fitted, "-m", fitted.reg_model, "-i", tmp_path / data]
        refused([*args, "-o", "out/p.safetensors"], 1, "decompression bomb", [tmp_path])


# --------------------------------------------------------------- non-regular files


def test_fifos_and_folders_are_refused_as_every_input(fitted, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    task = ["--task", "regression", "-o", "out/f"]
    fit = ["fit", fitted.reg_ckpt, "-m", fitted.reg_model, "-d", fitted.reg_train, *task]
    predict = ["predict", fitted.reg_fitted, "-m", fitted.reg_model, "-i", fitted.reg_train]
    cases = [
        (convert_args(fifo), 1),
        (convert_args(small_model(tmp_path / "m.safetensors"), "--spec", fifo), 2),
        (["kl", fifo], 1),
        (["inspect", fifo], 1),
        (["fit", fifo, *fit[2:]], 1),
        ([*fit[:3], fifo, *fit[4:]], 1),
        ([*fit[:5], fifo, *fit[6:]], 1),
        ([*fit, "--val", fifo], 1),
        ([*predict[:5], fifo, "-o", "out/p.safetensors"], 1),
        ([*predict, "--targets", fifo, "-o", "out/p.safetensors"], 1),
    ]
    for args, code in cases:
        refused(args, code, "FIFO", [])
    folder = tmp_path / "folder"
    folder.mkdir()
    refused([*predict[:5], folder], 1, "is a directory, not a regular file", [])
    os.mkfifo(folder / "model.safetensors")
    refused(convert_args(folder), 1, "is a FIFO", [])


def test_a_fifo_shard_is_refused(tmp_path):
    index = sharded(tmp_path / "model")
    (tmp_path / "model/s2.safetensors").unlink()
    os.mkfifo(tmp_path / "model/s2.safetensors")
    refused(convert_args(index), 1, "is a FIFO", [])


def test_a_fifo_model_fails_in_a_child_process_too(tmp_path):
    os.mkfifo(tmp_path / "model.pt")
    done = subprocess.run(
        [sys.executable, "-m", "bnnify", "convert", "model.pt", "-o", "out.safetensors"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1 and "is a FIFO" in done.stderr
    assert done.stderr.startswith("Error:") and "Traceback" not in done.stderr


# ------------------------------------------------------------ inconsistent checkpoints


def edited(path: Path, target: Path, tensors: dict | None = None, **metadata: str) -> Path:
    """A copy of checkpoint `path` with some tensors and metadata values replaced."""
    old_metadata, _ = read_header(path)
    save_file({**load_file(path), **(tensors or {})}, str(target), {**old_metadata, **metadata})
    return target


def parameters_with(path: Path, change) -> str:
    records = json.loads(read_header(path)[0]["bnnify.parameters"])
    change(records["fc.weight"])
    return json.dumps(records)


def rename_mu(record: dict) -> None:
    record["tensors"] = {"mean": record["tensors"]["mu"], "rho": record["tensors"]["rho"]}


CHECKPOINTS = {
    "rho of another shape": ({"fc.weight.rho": torch.zeros(5)}, {}, "is float32 (5,)"),
    "mu and metadata differ": ({"fc.weight.mu": torch.zeros(2, 3)}, {}, "metadata says"),
    "NaN mu": ({"fc.weight.mu": torch.full((3, 2), float("nan"))}, {}, "NaN or infinite"),
    "infinite rho": ({"fc.weight.rho": torch.full((3, 2), float("inf"))}, {}, "NaN or infinite"),
    "rho of zero spread": ({"fc.weight.rho": torch.full((3, 2), -1e3)}, {}, "softplus(rho) is 0"),
    "float64 mu": ({"fc.weight.mu": torch.zeros(3, 2, dtype=torch.float64)}, {}, "float64"),
    "renamed role": ({}, {"bnnify.parameters": rename_mu}, "posterior tensors ['mean', 'rho']"),
    "deep metadata": ({}, {"bnnify.parameters": "[" * 50_000 + "]" * 50_000}, "nested deeper"),
    "deep spec": ({}, {"bnnify.spec": '{"a":' * 500 + "1" + "}" * 500}, "nested deeper"),
    "duplicate key": ({}, {"bnnify.spec": '{"seed": 1, "seed": 2}'}, "'seed' appears twice"),
    "huge integer": ({}, {"bnnify.source": '{"n": ' + "9" * 5000 + "}"}, "not valid JSON"),
}


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_inconsistent_checkpoints_are_refused(tmp_path, case):
    tensors, metadata, match = CHECKPOINTS[case]
    good = checkpoint(tmp_path / "ckpt")
    fixed = {
        key: value if isinstance(value, str) else parameters_with(good, value)
        for key, value in metadata.items()
    }
    bad = edited(good, tmp_path / "bad.safetensors", tensors, **fixed)
    for command in (["kl"], ["inspect", "--stats"]):  # inspect reads tensors with --stats
        refused([*command, bad], 1, match, [tmp_path])


def test_kl_of_a_model_file_says_to_convert_it_first(tmp_path):
    torch.save({"w": torch.zeros(3)}, tmp_path / "model.pt")
    message = refused(["kl", tmp_path / "model.pt"], 1, "not a bnnify checkpoint", [tmp_path])
    assert "(a torch.save file): run `bnnify convert` first" in message


@pytest.mark.parametrize(
    ("log_noise", "match"),
    [(torch.tensor(1000.0), "is 1000: the noise scale"), (torch.zeros(3), "one floating-point")],
)
def test_a_fitted_noise_that_is_no_scale_is_refused(fitted, tmp_path, log_noise, match):
    bad = edited(
        fitted.reg_fitted, tmp_path / "bad.safetensors", {"bnnify.fit.log_noise": log_noise}
    )
    predict = [
        "predict",
        bad,
        "-m",
        fitted.reg_model,
        "-i",
        fitted.reg_train,
        "-o",
        "out/p.safetensors",
    ]
    refused(predict, 1, match, [tmp_path])
    fit = ["fit", bad, "-m", fitted.reg_model, "-d", fitted.reg_train, "--resume", "-o", "out/f"]
    refused(fit, 1, match, [tmp_path])


def test_malformed_kl_reports_are_refused(tmp_path):
    checkpoint(tmp_path / "ckpt")
    report = tmp_path / "ckpt/c.kl.safetensors"
    tensors = load_file(report)
    for values, match in ((torch.tensor([-1.0, 2.0]), "negative"), (torch.ones(3), "differ")):
        bad = edited(report, tmp_path / "bad.kl.safetensors", {"kl.per_parameter": values.double()})
        refused(["kl", bad], 1, match, [tmp_path])
    bad = edited(report, tmp_path / "bad.kl.safetensors", tensors, **{"bnnify.method": "guess"})
    refused(["kl", bad], 1, "unknown method", [tmp_path])


# ------------------------------------------------------ bad inputs, not internal errors


def test_bad_model_tensors_are_clean_errors(tmp_path):
    torch.save(nn.Linear(3, 0).state_dict(), tmp_path / "empty.pt")
    save_file({"w": torch.ones(2, 2).to(torch.float8_e4m3fn)}, str(tmp_path / "f8.safetensors"))
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(tmp_path / "nan.safetensors"))
    save_file({"w": torch.tensor([1e6, 1.0])}, str(tmp_path / "big.safetensors"))
    packed = b'{"w":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}'
    packed += b" " * (-len(packed) % 8)
    (tmp_path / "f4.safetensors").write_bytes(struct.pack("<Q", len(packed)) + packed + b"\0")
    cases = [
        ("empty.pt", [], "has no elements (shape (0, 3))"),
        ("f8.safetensors", [], "float8_e4m3fn, a dtype bnnify cannot compute"),
        ("f4.safetensors", [], "dtype 'F4', which bnnify cannot read"),
        ("nan.safetensors", [], "holds NaN or infinite values"),
        ("big.safetensors", ["--dtype", "float16"], "overflow float16"),
    ]
    for name, flags, match in cases:
        refused(convert_args(tmp_path / name, *flags), 1, match, [tmp_path])


def test_deep_and_duplicated_index_json_is_refused(tmp_path):
    index = sharded(tmp_path / "model")
    index.write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(convert_args(index), 1, "nested deeper than", [tmp_path])
    index.write_text('{"weight_map": {"a": "s1.safetensors", "a": "s2.safetensors"}}')
    refused(convert_args(index), 1, "'a' appears twice", [tmp_path])


def test_bad_data_files_are_clean_errors(fitted, tmp_path):
    import numpy as np

    def npy(name: str, shape: str) -> Path:
        header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
        text = header.ljust(117).encode() + b"\n"
        (tmp_path / name).write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + text)
        return tmp_path / name

    np.save(tmp_path / "x.npy", np.ones((4, 1), dtype=np.float32))
    save_file({"x": torch.ones(4, 1), "y": torch.tensor(1.0)}, str(tmp_path / "scalar.safetensors"))
    (tmp_path / "wide.csv").write_text("x,y\n" + "1" * 200_000 + ",2\n")
    predict = [
        "predict",
        fitted.reg_fitted,
        "-m",
        fitted.reg_model,
        "-o",
        "out/p.safetensors",
        "-i",
    ]
    fit = ["fit", fitted.reg_ckpt, "-m", fitted.reg_model, "--task", "regression", "-o", "out/f"]
    cases = [
        ([*predict, npy("negative.npy", "(-2, -3)")], "is not a tuple of sizes"),
        ([*predict, npy("letters.npy", "('a',)")], "is not a tuple of sizes"),
        ([*predict, tmp_path / "wide.csv"], "line 2 is not valid CSV"),
        ([*fit, "-d", tmp_path / "scalar.safetensors"], "targets are a single number"),
        ([*predict, tmp_path / "x.npy", "--targets", tmp_path / "scalar.safetensors"], "single"),
    ]
    for args, match in cases:
        refused(args, 1, match, [tmp_path])


def test_huge_values_are_not_echoed_whole(tmp_path):
    model = small_model(tmp_path / "m.safetensors")
    (tmp_path / "spec.yaml").write_text("seed: " + "9" * 1_000_000 + "\n")
    refused(convert_args(model, "--spec", tmp_path / "spec.yaml"), 2, "(1000002 characters)", [])


def test_many_tensors_convert(tmp_path):
    save_file({f"l{i}.weight": torch.ones(2) for i in range(300)}, str(tmp_path / "m.safetensors"))
    Path("out").mkdir()
    result = invoke(*convert_args(tmp_path / "m.safetensors"), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["reparametrized"] == 300
