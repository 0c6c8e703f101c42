"""Tests of bnnify.bnn.reach: a weight the output does not depend on is named and refused."""

from __future__ import annotations

import pytest
import torch

from bnnify.bnn.reach import refuse_not_one_tensor, refuse_stateful, refuse_unreached
from bnnify.errors import InputError


def test_weights_that_reach_the_output_pass_even_with_zero_gradients():
    w = torch.ones(3, requires_grad=True)
    dead = torch.ones(2, requires_grad=True)
    # A ReLU that is off everywhere gives a zero gradient, not a missing one: reached.
    output = {"y": [(w * 2).sum(), torch.relu(-dead).sum()], "count": 3}
    refuse_unreached(output, [w, dead], ["w", "dead"])


def test_unreached_weights_are_named_with_the_fix():
    used, cached, unused = (torch.ones(2, requires_grad=True) for _ in range(3))
    copy = cached.detach().clone()
    output = (used * copy).sum()
    with pytest.raises(InputError) as error:
        refuse_unreached(output, [used, cached, unused], ["a", "b", "c"], model="the net",
                         fix="Do X.")  # fmt: skip
    assert "the output of the net does not depend on the Bayesian parameter(s) 'b', 'c'" in (
        error.value.message
    )
    assert error.value.hint.startswith("Do X.") and "--exclude 'b'" in error.value.hint
    with pytest.raises(InputError) as error:
        refuse_unreached(used.sum(), [used, cached], ["head.w", "Tail[0].w"])
    assert error.value.hint.endswith("--exclude 'Tail[[]0].w'.")  # one name: exactly it, escaped


def test_the_exclude_hint_names_one_module_when_it_holds_every_unreached_weight():
    used = torch.ones(2, requires_grad=True)
    unused = [torch.ones(1, requires_grad=True) for _ in range(6)]
    names = ["net.w", *(f"net_8k.{i}.w" for i in range(3)), "a.w", "b.w", "c.w"]
    hints = {
        # One module holds them, and no used weight: one pattern.
        3: "--exclude 'net_8k.*'",
        # A pattern 'net*' would also catch net.w: each name.
        6: "--exclude 'net_8k.0.w' --exclude 'net_8k.1.w' --exclude 'net_8k.2.w' "
        "--exclude 'a.w' --exclude 'b.w' ...",
    }
    for count, flags in hints.items():
        with pytest.raises(InputError) as error:
            refuse_unreached(used.sum(), [used, *unused[:count]], names[: count + 1])
        assert error.value.hint.endswith(f"deterministic with {flags}.")
    many = [torch.ones(1, requires_grad=True) for _ in range(7)]
    with pytest.raises(InputError, match="'w0', 'w1', 'w2', 'w3', 'w4' and 2 more"):
        refuse_unreached(used.sum(), many, [f"w{i}" for i in range(7)])


def test_an_output_without_gradient_cannot_be_checked():
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(InputError, match=r"\(dtype int64\) carries no gradient"):
        refuse_unreached((w * 2).argmax(), [w], ["w"])
    with pytest.raises(InputError, match=r"\(dtype none\) carries no gradient"):
        refuse_unreached("text", [w], ["w"])


def test_a_model_that_answers_differently_the_second_time_is_refused():
    x = torch.tensor([1.0, 1e6])
    refuse_stateful({"y": x, "n": torch.tensor(3)}, {"y": x * (1 + 1e-9), "n": torch.tensor(3)})
    for second in (x + 0.5, x[:1], x.double(), [x, x]):
        with pytest.raises(InputError, match="keeps state between calls") as error:
            refuse_stateful(x, second, model="the TorchScript model")
        assert error.value.message.startswith("the TorchScript model gives another output")
    with pytest.raises(InputError, match="keeps state"):
        refuse_stateful(torch.tensor([1, 2]), torch.tensor([1, 3]))


def test_an_output_other_than_one_tensor_is_described():
    refuse_not_one_tensor(torch.ones(2, 3))
    cases = {
        "a list of 1 (tensor (2,))": [torch.ones(2)],
        "a tuple of 7 (tensor (1,), tensor (1,), tensor (1,), tensor (1,), int, ...)": (
            *[torch.ones(1)] * 4,
            *[3] * 3,
        ),
        "a dict": {"y": torch.ones(2)},
    }
    for what, output in cases.items():
        with pytest.raises(InputError) as error:
            refuse_not_one_tensor(output, model="the net")
        assert error.value.message.startswith(f"the net returns {what}, not one tensor")
        assert "picks it" in error.value.hint
