"""Module kinds: the classes behind each word, and each parameter's kind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnnify.bnn.kinds import KIND_CLASSES, kind_of_type, module_types, parameter_kinds
from bnnify.enums import ModuleKind


class Mixed(nn.Module):
    """One module of each kind, with names that hide what they are."""

    def __init__(self):
        super().__init__()
        self.a = nn.Embedding(5, 4)
        self.b = nn.Conv1d(4, 4, 1)
        self.c = nn.LayerNorm(4)
        self.d = nn.MultiheadAttention(4, 1, batch_first=True)
        self.e = nn.GRU(4, 4, batch_first=True)
        self.f = nn.Linear(4, 2)
        self.g = nn.Parameter(torch.ones(2))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.a(tokens)
        h = self.b(h.transpose(1, 2)).transpose(1, 2)
        h = self.c(h)
        h, _ = self.d(h, h, h)
        h, _ = self.e(h)
        return self.f(h[:, -1]) * self.g


EXPECTED = {
    "a.weight": "embedding",
    "b.weight": "conv",
    "b.bias": "conv",
    "c.weight": "norm",
    "c.bias": "norm",
    "d.in_proj_weight": "attention",
    "d.in_proj_bias": "attention",
    "d.out_proj.weight": "attention",  # a Linear inside attention: the outer kind wins
    "d.out_proj.bias": "attention",
    "e.weight_ih_l0": "rnn",
    "e.weight_hh_l0": "rnn",
    "e.bias_ih_l0": "rnn",
    "e.bias_hh_l0": "rnn",
    "f.weight": "linear",
    "f.bias": "linear",
    "g": "other",
}


def kinds_of(module: nn.Module) -> dict[str, str]:
    names = [name for name, _ in module.named_parameters()]
    return {n: k.value for n, k in parameter_kinds(names, module_types(module)).items()}


def test_every_parameter_of_a_module_has_its_kind():
    assert kinds_of(Mixed()) == EXPECTED


def test_torchscript_modules_are_named_by_the_classes_they_were_compiled_from(tmp_path):
    torch.jit.save(torch.jit.script(Mixed()), str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    assert module_types(loaded)["d.out_proj"] == (
        "torch.nn.modules.linear.NonDynamicallyQuantizableLinear"
    )
    assert kinds_of(loaded) == EXPECTED


def test_subclasses_share_the_kind_of_their_base():
    class MyLinear(nn.Linear):
        pass

    net = nn.Sequential(MyLinear(2, 2), nn.LazyLinear(2), nn.BatchNorm2d(2))
    assert kind_of_type(f"{MyLinear.__module__}.{MyLinear.__qualname__}") is ModuleKind.LINEAR
    assert [kind_of_type(t) for t in module_types(net).values()] == [
        None,
        ModuleKind.LINEAR,
        ModuleKind.LINEAR,
        ModuleKind.NORM,
    ]


@pytest.mark.parametrize("kind", [k for k in ModuleKind if k is not ModuleKind.OTHER])
def test_every_kind_but_other_names_classes(kind):
    assert KIND_CLASSES[kind]
    assert all(issubclass(cls, nn.Module) for cls in KIND_CLASSES[kind])
