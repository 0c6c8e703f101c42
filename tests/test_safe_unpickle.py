"""Training checkpoints with hyperparameter objects: inert stand-ins, never their code."""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import sys
import types
import typing

import pytest
import torch
from cli_helpers import invoke

from bnnify.demo import build_model
from bnnify.errors import UnsafeInputError
from bnnify.formats.model_files import load_model
from bnnify.formats.safe_unpickle import ALLOWED, StandIn, stand_ins_in, torch_load

# What the classes below would do if the file could run their code.
RAN: list[str] = []


def _fake(monkeypatch, qualified: str, namespace: dict, bases: tuple = (object,)) -> type:
    """A class importable under `qualified` while the test runs (so that pickle saves it)."""
    module_name, _, name = qualified.rpartition(".")
    parts = module_name.split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        if prefix not in sys.modules:
            monkeypatch.setitem(sys.modules, prefix, types.ModuleType(prefix))
    cls = type(name, bases, {"__module__": module_name, "__qualname__": name, **namespace})
    monkeypatch.setattr(sys.modules[module_name], name, cls, raising=False)
    return cls


def _loud(what: str):
    def method(self, *args, **kwargs):
        RAN.append(what)

    return method


@pytest.fixture
def lightning_like(monkeypatch, tmp_path):
    """A Lightning-style checkpoint whose hyperparameters hold allow-listed classes only."""
    RAN.clear()
    list_config = _fake(monkeypatch, "omegaconf.listconfig.ListConfig", {"__init__": _loud("LC")})
    list_config.__reduce__ = lambda self: (list_config, (["conv", "lstm"],))
    dict_config = _fake(
        monkeypatch, "omegaconf.dictconfig.DictConfig", {"__setstate__": _loud("DC.setstate")}
    )
    attribute_dict = _fake(
        monkeypatch,
        "lightning_fabric.utilities.data.AttributeDict",
        {"__setitem__": _loud("AD.setitem")},
        (dict,),
    )
    config = dict_config.__new__(dict_config)
    config.__dict__["content"] = {"lr": 0.1}
    hparams = attribute_dict()
    dict.update(
        hparams,
        {
            "layers": list_config.__new__(list_config),
            "config": config,
            "args": argparse.Namespace(lr=0.1, epochs=3),
            "counts": collections.defaultdict(list, {"a": [1]}),
            "annotation": typing.Any,
            "types": [dict, list, int],
        },
    )
    reference = build_model().state_dict()
    content = {
        "epoch": 3,
        "state_dict": reference,
        "hyper_parameters": hparams,
        "pytorch-lightning_version": "2.1.0",
        "versions": {"torch": torch.__version__},
        "callbacks": {"EarlyStopping": {"best_score": torch.tensor(0.25)}},
    }
    path = tmp_path / "model.ckpt"
    torch.save(content, path)
    RAN.clear()
    return path, reference


@pytest.mark.parametrize("installed", [False, True], ids=["not_installed", "installed"])
def test_allow_listed_hyperparameters_load_as_inert_stand_ins(
    lightning_like, monkeypatch, installed
):
    path, reference = lightning_like
    if not installed:
        for name in [n for n in sys.modules if n.startswith(("omegaconf", "lightning_fabric"))]:
            monkeypatch.delitem(sys.modules, name)
    content = torch_load(path, "cpu", trust_pickle=False)
    # Nothing of the classes ran, and nothing was imported to find them.
    assert RAN == []
    assert installed or not any(n.startswith("omegaconf") for n in sys.modules)
    assert stand_ins_in(content) == [
        "argparse.Namespace",
        "builtins.dict",
        "builtins.int",
        "builtins.list",
        "omegaconf.dictconfig.DictConfig",
        "omegaconf.listconfig.ListConfig",
        "torch.torch_version.TorchVersion",
        "typing.Any",
    ]
    hparams = content["hyper_parameters"]
    assert type(hparams) is dict and type(hparams["counts"]) is dict  # plain dicts, filled
    assert isinstance(hparams["config"], StandIn) and not hasattr(hparams["config"], "__dict__")
    with load_model(path) as loaded:
        assert loaded.key == "state_dict"
        assert loaded.names() == list(reference)


def test_a_class_off_the_list_is_still_refused(monkeypatch, tmp_path):
    train_config = _fake(monkeypatch, "mypkg.config.TrainConfig", {})
    content = {"state_dict": build_model().state_dict(), "hyper_parameters": train_config()}
    torch.save(content, tmp_path / "model.ckpt")
    with pytest.raises(UnsafeInputError, match=r"mypkg\.config\.TrainConfig.*not on"):
        load_model(tmp_path / "model.ckpt")
    result = invoke("convert", tmp_path / "model.ckpt", "--json")
    assert result.exit_code == 3 and result.stdout == ""
    assert "mypkg.config.TrainConfig" in result.stderr and "--trust-pickle" in result.stderr


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_call_of_a_function_is_refused_beside_allowed_classes(tmp_path):
    content = {"state_dict": build_model().state_dict(), "args": argparse.Namespace(x=_Exploit())}
    torch.save(content, tmp_path / "model.ckpt")
    with pytest.raises(UnsafeInputError, match=r"posix\.system|os\.system"):
        load_model(tmp_path / "model.ckpt")


def test_an_allowed_name_cannot_be_used_to_call_what_it_receives(tmp_path):
    # REDUCE(argparse.Namespace, (os.system,)) would need os.system as a global: refused.
    # Namespace(os.system), pickled by hand.
    payload = b"\x80\x02cargparse\nNamespace\nq\x00cos\nsystem\nq\x01\x85q\x02Rq\x03."
    with open(tmp_path / "raw.pt", "wb") as stream:
        stream.write(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.")  # legacy magic
        stream.write(b"\x80\x02M\xe9\x03.")  # protocol version 1001
        stream.write(b"\x80\x02}q\x00.")  # sys_info
        stream.write(payload)
    with pytest.raises(UnsafeInputError, match=r"os\.system"):
        torch_load(tmp_path / "raw.pt", "cpu", trust_pickle=False)


def test_every_allowed_name_is_a_qualified_class_name_with_a_reason():
    for name, reason in ALLOWED.items():
        module, _, attribute = name.rpartition(".")
        assert module and attribute and reason
    assert pickle.loads(pickle.dumps([1])) == [1]  # the stand-ins leave pickle itself alone


def test_convert_reads_a_lightning_checkpoint(lightning_like, tmp_path):
    path, _ = lightning_like
    result = invoke("convert", path, "-o", tmp_path / "m.bnn.safetensors", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["source"]["key"] == "state_dict" and data["reparametrized"] == 6
    assert RAN == []
