"""Hugging Face folders of pytorch_model.bin, and sharded torch.save checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch
from cli_helpers import invoke
from safetensors.torch import save_file
from torch import nn

from bnnify.errors import FormatError, UnsafeInputError
from bnnify.formats.detect import ModelFormat, detect_format, resolve_model_path, sha256_file
from bnnify.formats.model_files import load_model


def bert_like() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 10))
    net[3].weight = net[0].weight  # tied, as a decoder tied to the embeddings
    return net


def save_bin_shards(module: nn.Module, folder, shards: int = 2):
    """`pytorch_model-0000i-of-0000n.bin` shards and their `pytorch_model.bin.index.json`.

    The tied embedding and decoder weights go into one shard, as torch.save keeps a tie
    only within one file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    state = module.state_dict()
    names = sorted(state, key=lambda n: n not in ("0.weight", "3.weight"))
    weight_map = {}
    for i in range(shards):
        part = {n: state[n] for n in names[i::shards] if n != "3.weight"}
        part |= {"3.weight": state["3.weight"]} if i == 0 else {}
        shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save(part, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = folder / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def test_a_folder_of_pytorch_model_bin_loads_as_a_state_dict(tmp_path):
    module = bert_like()
    torch.save(module.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(tmp_path) == tmp_path / "pytorch_model.bin"
    with load_model(tmp_path) as loaded:
        assert loaded.format is ModelFormat.STATE_DICT
        assert loaded.names() == list(module.state_dict())
        assert loaded.ties() == {"3.weight": "0.weight"}


def test_a_folder_prefers_safetensors_as_hugging_face_does(tmp_path):
    module = bert_like()
    torch.save(module.state_dict(), tmp_path / "pytorch_model.bin")
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    assert resolve_model_path(tmp_path) == tmp_path / "model.safetensors"
    save_bin_shards(module, tmp_path / "sharded")
    assert resolve_model_path(tmp_path / "sharded").name == "pytorch_model.bin.index.json"


def test_sharded_bin_checkpoints_load_like_sharded_safetensors(tmp_path):
    module = bert_like()
    index = save_bin_shards(module, tmp_path / "m")
    assert detect_format(tmp_path / "m") is ModelFormat.SHARDED_STATE_DICT
    with load_model(tmp_path / "m") as loaded, load_model(index) as by_index:
        assert loaded.format is ModelFormat.SHARDED_STATE_DICT
        assert sorted(loaded.names()) == sorted(module.state_dict())
        assert loaded.sha256 == by_index.sha256 == sha256_file(index)
        for name, tensor in module.state_dict().items():
            assert torch.equal(loaded.tensor(name), tensor)
            assert loaded.meta(name).kind == "unknown"


def test_convert_of_a_sharded_bin_folder_writes_a_sharded_checkpoint(tmp_path):
    module = bert_like()
    save_bin_shards(module, tmp_path / "m")
    out = tmp_path / "out" / "m.bnn.safetensors"
    out.parent.mkdir()
    result = invoke("convert", tmp_path / "m", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["source"]["format"] == "sharded_state_dict"
    assert data["outputs"][-2].endswith("m.bnn.safetensors.index.json")
    # The tied decoder weight is converted once, under the embedding's name.
    assert "3.weight" not in [p["name"] for p in data["parameters"]]


def test_a_shard_holding_a_pickled_object_is_refused_as_unsafe(tmp_path):
    index = save_bin_shards(bert_like(), tmp_path / "m")
    torch.save({"0.weight": torch.ones(2), "x": nn.Linear(1, 1)}, tmp_path / "m" / (
        json.loads(index.read_text())["weight_map"]["0.weight"]
    ))  # fmt: skip
    with pytest.raises(UnsafeInputError, match=r"torch\.nn\.modules\.linear\.Linear"):
        load_model(index)


def test_mixed_and_nested_shards_are_refused(tmp_path):
    folder = tmp_path / "m"
    index = save_bin_shards(bert_like(), folder)
    weight_map = json.loads(index.read_text())["weight_map"]
    first = weight_map["0.weight"]
    save_file({"0.weight": torch.ones(2)}, str(folder / first))
    with pytest.raises(FormatError, match="mixes safetensors shards"):
        load_model(index)
    # A shard that is itself an index would make the reader loop: refused.
    (folder / first).write_text(index.read_text())
    with pytest.raises(FormatError, match="not a model file"):
        load_model(index)


def test_a_bin_shard_outside_the_folder_is_refused(tmp_path):
    index = save_bin_shards(bert_like(), tmp_path / "m")
    shard = json.loads(index.read_text())["weight_map"]["0.weight"]
    (tmp_path / "elsewhere.bin").write_bytes((tmp_path / "m" / shard).read_bytes())
    os.remove(tmp_path / "m" / shard)
    os.symlink(tmp_path / "elsewhere.bin", tmp_path / "m" / shard)
    with pytest.raises(UnsafeInputError, match="outside the index's folder"):
        load_model(index)


def test_an_empty_folder_says_what_it_looks_for(tmp_path):
    with pytest.raises(FormatError, match=r"pytorch_model\.bin"):
        load_model(tmp_path)
