"""Tests of `bnnify.io.export_archive`: crafted .pt2 archives that would run code are refused.

Every construction is built in `tmp_path` from a real `torch.export.save` archive; its
payload writes a marker file when unpickled or run. Each test asserts the refusal, its
exit code, and that the marker does not exist; `test_the_payloads_are_live` shows that
torch itself, unguarded, runs them.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import pickle
import subprocess
import threading
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import sympy
import torch
from cli_helpers import BNNIFY, flat, invoke
from safetensors.torch import load_file
from torch import nn

from bnnify.errors import EXIT_RUNTIME, EXIT_UNSAFE, FormatError, UnsafeInputError
from bnnify.io.export_archive import guarded, unlift
from bnnify.io.formats import ModelFormat, detect_format
from bnnify.io.models import load_model

ROOT = "archive"  # the root folder torch.export.save gives an archive written to a buffer
WEIGHTS = f"{ROOT}/data/weights/model_weights_config.json"
CONSTANTS = f"{ROOT}/data/constants/model_constants_config.json"
MODEL = f"{ROOT}/models/model.json"
SAMPLES = f"{ROOT}/data/sample_inputs/model.pt"


class Net(nn.Module):
    """A linear layer, a buffer and a tensor constant: weights, buffers and constants."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.register_buffer("shift", torch.ones(3))
        self.scale = torch.tensor([2.0, 3.0, 4.0])

    def forward(self, x):
        return self.linear(x) * self.scale + self.shift


class Branch(nn.Module):
    """A `torch.cond`: subgraphs, which the graph reaches by attribute name."""

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: x + 1, lambda x: x - 1, (x,))


class Payload:
    """Unpickling it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _saved(module: nn.Module, example: torch.Tensor, dynamic: bool = False) -> bytes:
    shapes = {"x": {0: torch.export.Dim("batch", min=2)}} if dynamic else None
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(module, (example,), dynamic_shapes=shapes), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def saved():
    """Archive bytes of real programs: plain, with a dynamic batch, with subgraphs."""
    return {
        "plain": _saved(Net(), torch.randn(2, 4)),
        "dynamic": _saved(Net(), torch.randn(5, 4), dynamic=True),
        "branch": _saved(Branch(), torch.randn(3)),
    }


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PAYLOAD-RAN"


# ------------------------------------------------------------------- building


def _members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def _write(path: Path, members, *, patch=(), compression=zipfile.ZIP_STORED) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", compression) as archive:
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        for name, data in members:
            archive.writestr(name, data)
    raw = path.read_bytes()
    for old, new in patch:  # zipfile cannot write some names (NUL, raw bytes)
        raw = raw.replace(old, new)
    path.write_bytes(raw)
    return path


def _pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _edit_json(members, name: str, edit) -> list[tuple[str, bytes]]:
    out = []
    for member, data in members:
        if member == name:
            value = json.loads(data)
            value = edit(value) or value
            data = json.dumps(value).encode()
        out.append((member, data))
    return out


def _replace_text(members, name: str, old: str, new: str) -> list[tuple[str, bytes]]:
    """`members` with `old` replaced in member `name` (JSON), which must contain it."""
    data = dict(members)[name].decode()
    assert old in data
    return [(m, data.replace(old, new).encode() if m == name else d) for m, d in members]


def _pickle_entry(config: dict, path_name: str) -> dict:
    """`config` with its first entry unpickled from `path_name` (torch: weights_only=False)."""
    key = next(iter(config["config"]))
    config["config"][key].update(path_name=path_name, use_pickle=True)
    return config


def _object_entry(path_name: str):
    def edit(config):
        entry = {"path_name": path_name, "is_param": False, "use_pickle": True, "tensor_meta": None}
        config["config"]["obj"] = entry

    return edit


def _module_on_path(tmp_path, monkeypatch, marker) -> str:
    """An importable module (unique name) that creates `marker` when imported."""
    name = f"payload_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        f"import enum\nopen({str(marker)!r}, 'w').close()\n"
        "class E(enum.Enum):\n    A = 1\ndef make():\n    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _in_spec(edit):
    """A model.json edit of the input pytree spec's kwargs node (a `builtins.dict`)."""

    def edit_model(model):
        signature = model["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(signature["in_spec"])
        edit(spec[1]["children_spec"][1])
        signature["in_spec"] = json.dumps(spec)

    return edit_model


def _enum_context(fqn: str, name: str):
    def edit(node):
        node["context"] = json.dumps([{"__enum__": True, "fqn": fqn, "name": name}])

    return edit


def _factory_context(module: str, name: str):
    def edit(node):
        node["type"] = "collections.defaultdict"  # its context is an object, not a string
        node["context"] = {
            "default_factory_module": module,
            "default_factory_name": name,
            "dict_context": [],
        }

    return edit


# -------------------------------------------------------------- constructions
# Each builds (members, byte patches) from a real archive's members; `env` holds
# marker, tmp_path and monkeypatch. Names follow issue 8's (a)-(d), then variants.


def _a_legacy_fallback(members, env):
    """(a) `<root>/archive_format` beside the pre-2.8 layout: torch.export.load falls back."""
    legacy = [
        ("version", b"8.0"),
        ("serialized_exported_program.json", dict(members)[MODEL]),
        ("serialized_state_dict.pt", _pickled(Payload(env["marker"]))),
        ("serialized_constants.pt", _pickled(Payload(env["marker"]))),
        ("serialized_example_inputs.pt", _pickled(((), {}))),
    ]
    return [(f"{ROOT}/archive_format", b"pt2"), *legacy], ()


def _a_legacy_beside_pt2(members, env):
    """(a) A complete .pt2 plus the legacy top-level members (torch's reader rejects those)."""
    legacy, _ = _a_legacy_fallback(members, env)
    return members + legacy[1:], ()


def _evil_weights(members, env):
    config = _pickle_entry(json.loads(dict(members)[WEIGHTS]), "evil")
    return json.dumps(config).encode(), (
        f"{ROOT}/data/weights/evil",
        _pickled(Payload(env["marker"])),
    )


def _b_nul_name(members, env):
    """(b) zipfile reads the harmless config named with a NUL, torch the pickling one."""
    evil, payload = _evil_weights(members, env)
    harmless = dict(members)[WEIGHTS]
    changed = [(n, evil if n == WEIGHTS else d) for n, d in members]
    return [*changed, payload, (WEIGHTS + "Z0", harmless)], [(b".jsonZ0", b".json\x000")]


def _c_nested_model(members, env):
    """(c) A second program at models/sub/m.json, its config at data/weights/sub/..."""
    data = dict(members)
    evil, payload = _evil_weights(members, env)
    return [
        *members,
        (f"{ROOT}/models/sub/m.json", data[MODEL]),
        (f"{ROOT}/data/weights/sub/m_weights_config.json", evil),
        (f"{ROOT}/data/constants/sub/m_constants_config.json", data[CONSTANTS]),
        (f"{ROOT}/data/sample_inputs/sub/m.pt", data[SAMPLES]),
        payload,
    ], ()


def _d_duplicate_first(members, env):
    """(d) The pickling config twice over the harmless one's name, first copy."""
    evil, payload = _evil_weights(members, env)
    return [(WEIGHTS, evil), *members, payload], ()


def _d_duplicate_last(members, env):
    evil, payload = _evil_weights(members, env)
    return [*members, (WEIGHTS, evil), payload], ()


def _d_duplicate_case(members, env):
    """(d) Names that differ in case only: torch's look-ups ignore case."""
    evil, payload = _evil_weights(members, env)
    return [(WEIGHTS.replace("model_weights", "MODEL_weights"), evil), *members, payload], ()


def _pickled_weight(members, env):
    evil, payload = _evil_weights(members, env)
    return [*((n, evil if n == WEIGHTS else d) for n, d in members), payload], ()


def _pickled_constant(members, env):
    edited = _edit_json(members, CONSTANTS, lambda c: _pickle_entry(c, "tensor_evil"))
    return [*edited, (f"{ROOT}/data/constants/tensor_evil", _pickled(Payload(env["marker"])))], ()


def _sample_inputs_retry(members, env):
    """Sample inputs that fail weights_only: torch retries with weights_only=False."""
    sample = _pickled(((torch.ones(2, 4),), {}, Payload(env["marker"])))
    return [(n, sample if n == SAMPLES else d) for n, d in members], ()


def _legacy_weights_file(members, env):
    return [*members, (f"{ROOT}/data/weights/model.pt", _pickled(Payload(env["marker"])))], ()


def _legacy_constants_file(members, env):
    return [*members, (f"{ROOT}/data/constants/model.pt", _pickled(Payload(env["marker"])))], ()


def _opaque_object(members, env):
    edited = _edit_json(members, CONSTANTS, _object_entry("opaque_obj_0"))
    obj = (f"{ROOT}/data/constants/opaque_obj_0", pickle.dumps(Payload(env["marker"])))
    return [*edited, obj], ()


def _custom_object(members, env):
    edited = _edit_json(members, CONSTANTS, _object_entry("custom_obj_0"))
    return [*edited, (f"{ROOT}/data/constants/custom_obj_0", b"PK\x03\x04")], ()


def _aotinductor(members, env):
    return [*members, (f"{ROOT}/data/aotinductor/model/model.so", b"\x7fELF")], ()


def _placeholder_name(members, env):
    """An input named `x=open(...)`: fx writes it as a default value, run at load."""
    name = json.dumps(f"x=open({str(env['marker'])!r}, 'w')")
    return _replace_text(members, MODEL, '"x"', name), ()


def _shape_expression(members, env):
    """A shape expression that sympify evaluates as Python."""
    symbol = "Symbol('s"
    model = dict(members)[MODEL].decode()
    start = model.index(symbol)
    expression = model[start : model.index(")", start) + 1]
    payload = f"(open({str(env['marker'])!r}, 'w') and 0) + {expression}"
    return _replace_text(members, MODEL, expression, payload), ()


def _enum_import(members, env):
    module = _module_on_path(env["tmp_path"], env["monkeypatch"], env["marker"])
    return _edit_json(members, MODEL, _in_spec(_enum_context(f"{module}:E", "A"))), ()


def _factory_import(members, env):
    module = _module_on_path(env["tmp_path"], env["monkeypatch"], env["marker"])
    return _edit_json(members, MODEL, _in_spec(_factory_context(module, "make"))), ()


def _enum_loads_library(members, env):
    """`ctypes.cdll[name]` through a pytree enum: a native library load."""
    return _edit_json(members, MODEL, _in_spec(_enum_context("ctypes:cdll", "libc.so.6"))), ()


def _argument_name(members, env):
    """An argument name that `program.module()` writes as a default value."""

    def edit(model):
        signature = model["graph_module"]["module_call_graph"][0]["signature"]
        signature["forward_arg_names"] = [f"x=open({str(env['marker'])!r}, 'w')"]

    return _edit_json(members, MODEL, edit), ()


def _input_guard(members, env):
    """A guard that `program.module()` compiles and runs with each call."""
    guard = f"open({str(env['marker'])!r}, 'w') is not None"
    return _edit_json(members, MODEL, lambda model: model.update(guards_code=[guard])), ()


def _subgraph_name(members, env):
    name = f'true_graph_0")\nopen({str(env["marker"])!r}, "w")\nif 1:#'
    return _replace_text(members, MODEL, '"true_graph_0"', json.dumps(name)), ()


def _outside_root(name):
    return lambda members, env: ([*members, (name, b"{}")], ())


def _control_name(members, env):
    return [*members, (f"{ROOT}/extra/\x1b[31mred", b"x")], ()


def _non_utf8_name(members, env):
    return [*members, (f"{ROOT}/extra/nameZ", b"x")], [(b"nameZ", b"name\xff")]


UNSAFE = {
    "a-legacy-fallback": ("plain", _a_legacy_fallback),
    "a-legacy-beside-pt2": ("plain", _a_legacy_beside_pt2),
    "b-nul-name": ("plain", _b_nul_name),
    "c-nested-model": ("plain", _c_nested_model),
    "d-duplicate-first": ("plain", _d_duplicate_first),
    "d-duplicate-last": ("plain", _d_duplicate_last),
    "d-duplicate-case": ("plain", _d_duplicate_case),
    "pickled-weight": ("plain", _pickled_weight),
    "pickled-constant": ("plain", _pickled_constant),
    "sample-inputs-retry": ("plain", _sample_inputs_retry),
    "legacy-weights-file": ("plain", _legacy_weights_file),
    "legacy-constants-file": ("plain", _legacy_constants_file),
    "opaque-object": ("plain", _opaque_object),
    "custom-object": ("plain", _custom_object),
    "aotinductor": ("plain", _aotinductor),
    "placeholder-name": ("plain", _placeholder_name),
    "shape-expression": ("dynamic", _shape_expression),
    "enum-import": ("plain", _enum_import),
    "factory-import": ("plain", _factory_import),
    "enum-loads-library": ("plain", _enum_loads_library),
    "argument-name": ("plain", _argument_name),
    "input-guard": ("dynamic", _input_guard),
    "subgraph-name": ("branch", _subgraph_name),
    "dot-dot-name": ("plain", _outside_root(f"{ROOT}/../escape")),
    "absolute-name": ("plain", _outside_root("/etc/escape")),
    "empty-part-name": ("plain", _outside_root(f"{ROOT}//escape")),
    "backslash-name": ("plain", _outside_root(f"{ROOT}/data\\escape")),
    "second-root": ("plain", _outside_root("other/archive_format")),
    "control-character-name": ("plain", _control_name),
    "non-utf8-name": ("plain", _non_utf8_name),
}
# Those whose payload torch itself runs, unguarded, from torch.export.load alone.
LIVE = [
    "a-legacy-fallback",
    "b-nul-name",
    "c-nested-model",
    "pickled-weight",
    "pickled-constant",
    "sample-inputs-retry",
    "legacy-weights-file",
    "opaque-object",
    "placeholder-name",
    "shape-expression",
    "enum-import",
    "factory-import",
]


@pytest.fixture
def craft(saved, tmp_path, marker, monkeypatch):
    """craft(name) -> the path of construction `name`, built in tmp_path."""
    env = {"marker": marker, "tmp_path": tmp_path, "monkeypatch": monkeypatch}

    def build(name: str) -> Path:
        program, construct = UNSAFE[name]
        members, patch = construct(_members(saved[program]), env)
        return _write(tmp_path / f"{name}.pt2", members, patch=patch)

    return build


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
        lambda: torch.load(io.BytesIO(_pickled(Payload(marker))), weights_only=False),
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
        torch.load(io.BytesIO(_pickled(OrderedDict(a=Payload(tmp_path / "m")))))


def test_unlift_checks_the_guards_it_compiles(saved, tmp_path, marker):
    path = _write(tmp_path / "net.pt2", _members(saved["dynamic"]))
    with load_model(path) as model:
        model.module._guards_code = [f"open({str(marker)!r}, 'w') is not None"]
        with pytest.raises(UnsafeInputError, match="input guard"):
            unlift(model.module, path)
    assert not marker.exists()


@pytest.mark.parametrize("program", ["plain", "dynamic", "branch"])
@pytest.mark.parametrize("trust", [False, True])
def test_real_programs_load_and_run(saved, tmp_path, program, trust):
    path = _write(tmp_path / "net.pt2", _members(saved[program]))
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
        for name, data in _members(saved["plain"]):
            archive.writestr(name, data)
    with zipfile.ZipFile(path) as archive:
        assert all(info.flag_bits & 0x8 for info in archive.infolist())
    with load_model(path) as model:
        assert len(model) == 4


def test_compressed_members_are_refused_as_not_torch_written(saved, tmp_path):
    path = _write(tmp_path / "net.pt2", _members(saved["plain"]), compression=zipfile.ZIP_DEFLATED)
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
    members = [(n, edit.get(n, d)) for n, d in _members(saved["plain"]) if edit.get(n, d)]
    path = _write(tmp_path / "net.pt2", members)
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
    path = _write(tmp_path / "net.pt2", _members(saved["dynamic"]))
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
    path = _write(tmp_path / "net.pt2", [m for m in _members(saved["plain"]) if m[0] != weight])
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
