"""Tests of model loading: format detection, every format's tensors, safety and errors."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import shutil
import sys
import types
import warnings
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bnnify.errors import (
    EXIT_UNSAFE,
    ArgumentTypeError,
    FormatError,
    InputError,
    InvalidArgumentError,
    UnknownNameError,
    UnsafeInputError,
    UsageError,
)
from bnnify.formats.model_files import (
    LoadedModel,
    ModelFormat,
    TensorMeta,
    detect_format,
    from_module,
    load_model,
    sha256_file,
)

# Loading TorchScript is what these tests are about.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class TiedNet(nn.Module):
    """Tied weights, a non-persistent buffer and a tensor constant."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)
        self.const = torch.tensor([1.0, -1.0])

    def forward(self, index):
        return self.head(self.emb(index) * self.scale)[..., :2] * self.const


class Opaque:
    """An arbitrary picklable object: weights-only loading refuses it."""


def _mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _cnn():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)
    )
    net(torch.randn(8, 1, 6, 6))  # non-trivial running statistics
    return net.eval()


MODELS = {
    "mlp": (_mlp, lambda: torch.randn(2, 4)),
    "cnn": (_cnn, lambda: torch.randn(2, 1, 6, 6)),
    "lstm": (LSTMNet, lambda: torch.randn(2, 7, 3)),
}


def _expected(module):
    """(name, tensor, kind) of a module's tensors, as named_parameters/named_buffers list them."""
    entries = [(n, t, "parameter") for n, t in module.named_parameters()]
    return entries + [(n, t, "buffer") for n, t in module.named_buffers()]


def _meta(name, tensor, kind):
    return TensorMeta(name, tensor.dtype, tuple(tensor.shape), kind)


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _save_export(module, example, path):
    program = torch.export.export(module, (example,))
    buffer = io.BytesIO()  # torch.export.save warns about paths not ending in ".pt2"
    torch.export.save(program, buffer)
    path.write_bytes(buffer.getvalue())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each model built once, saved in every format (export is slow: once per session)."""
    root = tmp_path_factory.mktemp("models")
    files, modules = {}, {}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # torch.jit.trace is deprecated, and export warns about LSTM's flat weights.
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        for key, (build, example) in MODELS.items():
            module = build().eval()
            modules[key] = module
            x = example()
            # Misleading extensions everywhere: detection must read the content.
            files[key] = {
                "script": root / f"{key}_script.safetensors",
                "trace": root / f"{key}_trace.json",
                "export": root / f"{key}_export.pt",
            }
            torch.jit.save(torch.jit.script(module), files[key]["script"])
            torch.jit.save(torch.jit.trace(module, (x,)), files[key]["trace"])
            _save_export(module, x, files[key]["export"])
        modules["tied"] = tied = TiedNet().eval()
        files["tied"] = {"script": root / "tied_script.bin", "export": root / "tied_export.bin"}
        torch.jit.save(torch.jit.script(tied), files["tied"]["script"])
        _save_export(tied, torch.tensor([1, 2]), files["tied"]["export"])
    return files, modules


# ---------------------------------------------------------------- TorchScript / export


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("kind", ["script", "trace", "export"])
def test_program_tensors_match_the_source_module(saved, key, kind):
    files, modules = saved
    expected = _expected(modules[key])
    fmt = ModelFormat.EXPORT if kind == "export" else ModelFormat.TORCHSCRIPT
    assert detect_format(files[key][kind]) is fmt
    with load_model(files[key][kind]) as model:
        assert model.format is fmt
        assert model.names() == [name for name, _, _ in expected]
        for name, tensor, kind_ in expected:
            assert model.meta(name) == _meta(name, tensor, kind_)
            loaded = model.tensor(name)
            assert _same(loaded, tensor) and not loaded.requires_grad
        if fmt is ModelFormat.EXPORT:
            assert isinstance(model.module, torch.export.ExportedProgram)
        else:
            assert isinstance(model.module, torch.jit.ScriptModule)


def test_export_lists_tied_weights_once_and_constants_as_buffers(saved):
    files, modules = saved
    tied = modules["tied"]
    with load_model(files["tied"]["export"]) as model:
        assert model.names() == ["emb.weight", "scale", "const"]
        assert [model.meta(n).kind for n in model.names()] == ["parameter", "buffer", "buffer"]
        assert _same(model.tensor("emb.weight"), tied.emb.weight.detach())
        assert _same(model.tensor("const"), tied.const)
    with load_model(files["tied"]["script"]) as model:
        assert model.names() == ["emb.weight", "scale"]


def test_trusting_a_safe_export_program_changes_nothing(saved):
    files, _ = saved
    with (
        load_model(files["mlp"]["export"]) as a,
        load_model(files["mlp"]["export"], trust_pickle=True) as b,
    ):
        assert a.names() == b.names()
        assert all(_same(a.tensor(n), b.tensor(n)) for n in a.names())


def _rewrite(source, target, replace=None, extra=None):
    """Copies a zip archive, replacing records whose name ends with a key of `replace`."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        root = src.namelist()[0].split("/")[0]
        for name in src.namelist():
            data = src.read(name)
            for suffix, new in (replace or {}).items():
                if name.endswith(suffix):
                    data = new
            dst.writestr(name, data)
        for name, data in (extra or {}).items():
            dst.writestr(f"{root}/{name}", data)


def _pickled(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "change",
    [
        {"extra": {"data/aotinductor/model/model.so": b"\x7fELF"}},
        {"extra": {"data/constants/custom_obj_0": b"x"}},
        {"replace": {"data/sample_inputs/model.pt": _pickled(((torch.ones(2, 4),), {}, Opaque()))}},
    ],
    ids=["aotinductor", "custom-object", "sample-inputs-pickle"],
)
def test_export_programs_that_could_run_code_are_refused(saved, tmp_path, change):
    files, _ = saved
    target = tmp_path / "doctored.pt2"
    _rewrite(files["mlp"]["export"], target, **change)
    assert detect_format(target) is ModelFormat.EXPORT
    with pytest.raises(UnsafeInputError, match="trust-pickle") as caught:
        load_model(target)
    assert caught.value.exit_code == EXIT_UNSAFE


def test_a_corrupt_export_archive_is_a_format_error(saved, tmp_path):
    files, _ = saved
    target = tmp_path / "corrupt.pt2"
    _rewrite(files["mlp"]["export"], target, replace={"models/model.json": b"{}"})
    with pytest.raises(FormatError, match=r"torch\.export"):
        load_model(target)


# ----------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("zip_format", [True, False])
def test_state_dicts_load_every_entry(saved, tmp_path, key, zip_format):
    _, modules = saved
    state = modules[key].state_dict()
    path = tmp_path / "weights.safetensors"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    assert detect_format(path) is ModelFormat.STATE_DICT
    with load_model(path) as model:
        assert model.format is ModelFormat.STATE_DICT and model.module is None
        assert model.names() == list(state)
        for name, tensor in state.items():
            assert model.meta(name) == TensorMeta(
                name, tensor.dtype, tuple(tensor.shape), "unknown"
            )
            assert _same(model.tensor(name), tensor)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model"])
def test_nested_checkpoints_use_the_single_state_dict(saved, tmp_path, key):
    state = saved[1]["cnn"].state_dict()
    path = tmp_path / "checkpoint.pt"
    torch.save({key: state, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    with load_model(path) as model:
        assert model.names() == list(state)
        assert _same(model.tensor("1.running_var"), state["1.running_var"])


@pytest.mark.parametrize(
    "content",
    [
        {"epoch": 3, "best": 0.5},
        {"state_dict": {"w": torch.ones(1)}, "model": {"w": torch.ones(1)}},
        {},
    ],
    ids=["no-state-dict", "two-state-dicts", "empty"],
)
def test_checkpoints_without_a_single_state_dict_are_refused(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    torch.save(content, path)
    with pytest.raises(FormatError) as caught:
        load_model(path)
    for key in content:
        assert repr(key) in str(caught.value)


def test_non_tensor_entries_of_a_state_dict_are_ignored(tmp_path, caplog):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2), "step": 3, "name": "x"}, path)
    with caplog.at_level("DEBUG", logger="bnnify"), load_model(path) as model:
        assert model.names() == ["w"]
    assert "'step'" in caplog.text


@pytest.mark.parametrize("content", [torch.ones(3), [torch.ones(3)]], ids=["tensor", "list"])
def test_a_pickle_of_something_else_is_refused(tmp_path, content):
    path = tmp_path / "weights.pt"
    torch.save(content, path)
    with pytest.raises(FormatError, match="not a state dict"):
        load_model(path)


# -------------------------------------------------------------------- pickled modules


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickled_modules_need_trust(saved, tmp_path, zip_format):
    module = saved[1]["cnn"]
    path = tmp_path / "model.pt"
    torch.save(module, path, _use_new_zipfile_serialization=zip_format)
    assert detect_format(path) is ModelFormat.STATE_DICT
    with pytest.raises(UnsafeInputError) as caught:
        load_model(path)
    message = str(caught.value)
    assert caught.value.exit_code == EXIT_UNSAFE
    assert "torch.nn.modules" in message and "arbitrary code" in message
    assert "--trust-pickle" in message and "state_dict()" in message
    with load_model(path, trust_pickle=True) as model:
        assert model.format is ModelFormat.PICKLED_MODULE
        assert isinstance(model.module, nn.Sequential)
        expected = _expected(module)
        assert model.names() == [name for name, _, _ in expected]
        assert [model.meta(n).kind for n in model.names()] == [k for _, _, k in expected]
        assert all(_same(model.tensor(n), t.detach()) for n, t, _ in expected)


def test_arbitrary_objects_need_trust(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2), "extra": Opaque()}, path)
    with pytest.raises(UnsafeInputError, match="Opaque"):
        load_model(path)
    with load_model(path, trust_pickle=True) as model:
        assert model.format is ModelFormat.STATE_DICT and model.names() == ["w"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickles_the_safe_unpickler_cannot_read_need_trust(tmp_path):
    path = tmp_path / "weights.pt"
    # torch's weights-only unpickler does not know protocol 4's FRAME opcode.
    torch.save({"w": torch.ones(2)}, path, pickle_protocol=4, _use_new_zipfile_serialization=False)
    assert detect_format(path) is ModelFormat.STATE_DICT
    with pytest.raises(UnsafeInputError, match="weights-only unpickler cannot read"):
        load_model(path)
    with load_model(path, trust_pickle=True) as model:
        assert model.names() == ["w"]


def test_a_damaged_state_dict_is_a_format_error(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, path)
    damaged = tmp_path / "damaged.pt"
    _rewrite(path, damaged, replace={"data.pkl": b""})
    for trust_pickle in (False, True):
        with pytest.raises(FormatError, match=r"corrupt torch\.save file"):
            load_model(damaged, trust_pickle=trust_pickle)


def test_a_trusted_checkpoint_may_hold_the_module(saved, tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": saved[1]["mlp"], "epoch": 1}, path)
    with load_model(path, trust_pickle=True) as model:
        assert model.format is ModelFormat.PICKLED_MODULE
        assert model.names() == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_a_trusted_pickle_of_a_missing_class_is_an_input_error(tmp_path, monkeypatch):
    gone = types.ModuleType("bnnify_test_gone")
    exec("class Net:\n    pass", gone.__dict__)
    gone.Net.__module__ = "bnnify_test_gone"
    monkeypatch.setitem(sys.modules, "bnnify_test_gone", gone)
    path = tmp_path / "model.pt"
    torch.save(gone.Net(), path)
    monkeypatch.delitem(sys.modules, "bnnify_test_gone")
    with pytest.raises(InputError, match="could not be unpickled") as caught:
        load_model(path, trust_pickle=True)
    assert not isinstance(caught.value, FormatError)


# ------------------------------------------------------------------------ safetensors


def test_safetensors_files_read_metadata_without_loading(tmp_path):
    tensors = {
        "b.weight": torch.randn(3, 2),
        "a.half": torch.randn(4).half(),
        "a.bf16": torch.randn(2, 2).bfloat16(),
        "mask": torch.tensor([True, False]),
        "count": torch.tensor(7),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "model.pt"
    save_file(tensors, path)
    assert detect_format(path) is ModelFormat.SAFETENSORS
    with load_model(path) as model:
        assert sorted(model.names()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert model.meta(name) == TensorMeta(
                name, tensor.dtype, tuple(tensor.shape), "unknown"
            )
            assert _same(model.tensor(name), tensor)
    with pytest.raises(UsageError, match="closed"):
        model.tensor("mask")
    assert model.meta("mask").numel == 2


def test_a_directory_with_model_safetensors_is_that_file(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    assert detect_format(tmp_path) is ModelFormat.SAFETENSORS
    assert sha256_file(tmp_path) == sha256_file(tmp_path / "model.safetensors")
    with load_model(tmp_path) as model:
        assert model.path == tmp_path and model.names() == ["w"]


def _shard(tmp_path, state, shards=3):
    """Writes `state` as a Hugging Face sharded checkpoint; returns the index path."""
    names = list(state)
    weight_map = {}
    for k in range(shards):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[k::shards]}
        save_file(part, tmp_path / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def test_sharded_checkpoints_read_every_shard(saved, tmp_path):
    state = saved[1]["cnn"].state_dict()
    index = _shard(tmp_path, state)
    for path in (tmp_path, index):
        assert detect_format(path) is ModelFormat.SHARDED
        with load_model(path) as model:
            assert model.format is ModelFormat.SHARDED
            assert sorted(model.names()) == sorted(state)
            for name, tensor in state.items():
                assert model.meta(name).shape == tuple(tensor.shape)
                assert _same(model.tensor(name), tensor)
    digest = hashlib.sha256(index.read_bytes())
    for shard in sorted(p.name for p in tmp_path.glob("*-of-*.safetensors")):
        digest.update((tmp_path / shard).read_bytes())
    assert sha256_file(tmp_path) == sha256_file(index) == digest.hexdigest()


def test_sharded_checkpoint_errors(saved, tmp_path):
    state = saved[1]["mlp"].state_dict()
    index = _shard(tmp_path, state)
    original = json.loads(index.read_text())

    def write(weight_map):
        index.write_text(json.dumps({"weight_map": weight_map}))

    write({**original["weight_map"], "extra.weight": original["weight_map"]["0.weight"]})
    with pytest.raises(FormatError, match=r"lack.*extra\.weight"):
        load_model(index)
    write({**original["weight_map"], "x": "missing.safetensors"})
    with pytest.raises(FormatError, match=r"missing\.safetensors"):
        load_model(tmp_path)
    with pytest.raises(FormatError, match=r"missing\.safetensors"):
        sha256_file(tmp_path)
    write({"x": "../model.safetensors"})
    with pytest.raises(UnsafeInputError, match="outside"):
        load_model(index)
    write({"x": 3})
    with pytest.raises(FormatError, match="weight map"):
        load_model(index)
    index.write_text('{"weight_map": ')
    with pytest.raises(FormatError, match="not valid JSON"):
        load_model(tmp_path)
    index.write_text('{"metadata": {}}')
    with pytest.raises(FormatError, match="weight_map"):
        load_model(index)
    shutil.copy(index, tmp_path / "other.safetensors.index.json")
    with pytest.raises(FormatError, match="several index files"):
        detect_format(tmp_path)


def test_a_name_missing_from_the_index_is_ignored(tmp_path):
    save_file({"a": torch.ones(1), "b": torch.zeros(1)}, tmp_path / "s.safetensors")
    index = tmp_path / "i.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s.safetensors"}}))
    with load_model(index) as model:
        assert model.names() == ["a"]


# ----------------------------------------------------------------------------- errors


def _truncated_zip(tmp_path):
    full = tmp_path / "full.pt"
    torch.save({"w": torch.randn(100)}, full)
    data = full.read_bytes()
    return data[: len(data) // 2]


def _foreign_zip(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("docs/readme.txt", "hello")
    return buffer.getvalue()


def _truncated_safetensors(tmp_path):
    save_file({"w": torch.randn(100)}, tmp_path / "full.safetensors")
    return (tmp_path / "full.safetensors").read_bytes()[:-40]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (lambda _: b"", "empty"),
        (lambda _: torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes(), "not a"),
        (_truncated_zip, "truncated or corrupt zip"),
        (lambda _: b"name,value\nw,1.0\n", "not a model file"),
        (lambda _: b'{"architectures": ["Bert"]}', r"not a sharded checkpoint.s index"),
        (_foreign_zip, "not a PyTorch file"),
        (_truncated_safetensors, "not a valid safetensors file"),
    ],
    ids=["empty", "random", "truncated-zip", "text", "json", "foreign-zip", "truncated-st"],
)
def test_unreadable_files_are_format_errors(tmp_path, content, match):
    path = tmp_path / "model.pt"
    path.write_bytes(content(tmp_path))
    with pytest.raises(FormatError, match=match) as caught:
        load_model(path)
    if match != "not a valid safetensors file":  # recognized as safetensors, then damaged
        assert "Supported formats" in str(caught.value)


def test_missing_paths_and_empty_directories(tmp_path):
    with pytest.raises(InputError, match="does not exist") as caught:
        load_model(tmp_path / "nope.pt")
    assert not isinstance(caught.value, FormatError)
    with pytest.raises(FormatError, match="holds no"):
        load_model(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        sha256_file(tmp_path / "nope.pt")


# -------------------------------------------------------------------------- the API


def test_sha256_is_the_digest_of_the_file_and_stable(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.arange(5.0)}, path)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == sha256_file(str(path)) == expected
    with load_model(path) as model:
        assert model.sha256 == expected
    torch.save({"w": torch.arange(6.0)}, path)
    assert sha256_file(path) != expected


def test_loaded_model_api(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.ones(2, 3), "fc.bias": torch.zeros(2)}, path)
    model = load_model(path)
    assert isinstance(model, LoadedModel)
    assert len(model) == 2 and "fc.bias" in model and "fc.b" not in model
    assert "state_dict" in repr(model) and "tensors=2" in repr(model)
    with pytest.raises(UnknownNameError, match=r"Did you mean 'fc\.weight'"):
        model.meta("fc.weigth")
    with pytest.raises(UnknownNameError):
        model.tensor("nope")
    model.close()
    model.close()
    with pytest.raises(UsageError, match="closed"):
        model.tensor("fc.bias")


def test_an_invalid_device_is_an_argument_error(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(InvalidArgumentError, match="device"):
        load_model(path, device="gpu0")


def test_a_module_in_memory_is_a_model_of_format_module():
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    model = from_module(net)
    assert model.format is ModelFormat.MODULE and model.module is net
    assert model.names() == list(net.state_dict())
    assert model.meta("1.running_mean").kind == "buffer"
    assert model.meta("0.weight").kind == "parameter"
    assert torch.equal(model.tensor("0.weight"), net[0].weight.detach())
    # The digest is that of the state dict: equal for equal weights, else different.
    twin = copy.deepcopy(net)
    assert from_module(twin).sha256 == model.sha256
    with torch.no_grad():
        twin[0].bias.add_(1e-6)
    assert from_module(twin).sha256 != model.sha256
    with pytest.raises(ArgumentTypeError, match="got dict"):
        from_module({"weight": torch.ones(1)})
