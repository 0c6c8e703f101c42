"""The checks that a model's output depends on its sampled weights, and on nothing else.

A model run with sampled weights can still compute with something else: a copy of a
weight cached when the model was built, a view kept before the weight was replaced, a
parameter it never uses. The samples of such a weight never reach the predictions,
whose spread is then too small with no error anywhere. Whoever installs the weights
(`BayesianModule.given_weights`, the TorchScript installer) runs the model once on a
couple of examples with leaf tensors as weights and calls `refuse_unreached`. A model
that keeps state between calls gives each sample the state the previous one left:
two calls on the same inputs and weights differ (`refuse_stateful`).
"""

from __future__ import annotations

import glob
import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from bnnify.bnn.collect import matches
from bnnify.errors import InputError

__all__ = ["refuse_not_one_tensor", "refuse_stateful", "refuse_unreached"]

# Float outputs of two identical calls may differ by rounding (nondeterministic kernels);
# a model that keeps state between calls drifts by far more.
_REPEAT_TOLERANCE = 1e-5


def refuse_unreached(
    output: Any,
    leaves: Sequence[Tensor],
    names: Sequence[str],
    *,
    model: str = "the model",
    fix: str = "",
) -> None:
    """Refuses unless the autograd graph of `output` reaches every tensor of `leaves`.

    Args:
        output: What the model returned: a tensor, or lists, tuples and dicts of them.
        leaves: The weights it was run with, tensors requiring a gradient.
        names: The parameter name of each leaf (for the message).
        model: How the message names the model ("the TorchScript model").
        fix: What the user can do instead (the hint's first sentence).

    Raises:
        InputError: If no output carries a gradient, or naming the parameters whose
            leaves the output does not depend on.

    Example:
        >>> w, v = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
        >>> refuse_unreached((w * 2).sum(), [w], ["w"])
        >>> refuse_unreached((w * 2).sum(), [w, v], ["w", "v"])
        Traceback (most recent call last):
        ...
        bnnify.errors.InputError: the output of the model does not depend on the Bayesian ...
    """
    tensors = _tensors(output)
    outputs = [t for t in tensors if t.requires_grad]
    if not outputs:
        dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors}))
        raise InputError(
            f"the output of {model} (dtype {dtypes or 'none'}) carries no gradient, so "
            "bnnify cannot check that the sampled weights reach it",
            hint="Save a model that returns floating-point scores computed with autograd "
            f"(not under torch.no_grad). {fix}".strip(),
        )
    with torch.inference_mode(False), torch.enable_grad():
        grads = torch.autograd.grad(
            outputs, list(leaves), [torch.ones_like(t) for t in outputs], allow_unused=True
        )
    unreached = [name for name, grad in zip(names, grads, strict=True) if grad is None]
    if unreached:
        shown = ", ".join(repr(n) for n in unreached[:5])
        more = f" and {len(unreached) - 5} more" if len(unreached) > 5 else ""
        raise InputError(
            f"the output of {model} does not depend on the Bayesian parameter(s) {shown}{more}: "
            "the model reads them from a place bnnify cannot replace (a copy or a tensor "
            "computed from them when the model was built), or does not use them, so their "
            "samples would never reach the predictions",
            hint=f"{fix} If the parameters are unused, keep them deterministic with "
            f"{_exclude_flags(unreached, names)}.".lstrip(),
        )


def _exclude_flags(unreached: Sequence[str], names: Sequence[str]) -> str:
    """`--exclude` flags for exactly `unreached`: one module pattern when one holds several."""
    prefix = unreached[0].split(".")[:-1]
    for name in unreached[1:]:
        path = name.split(".")[:-1]
        same = itertools.takewhile(lambda pair: pair[0] == pair[1], zip(prefix, path, strict=False))
        prefix = [part for part, _ in same]
    if prefix and len(unreached) > 1:
        pattern = glob.escape(".".join(prefix)) + ".*"
        others = set(names) - set(unreached)
        if not any(matches(n, [pattern]) for n in others):
            return f"--exclude {pattern!r}"
    flags = " ".join(f"--exclude {glob.escape(n)!r}" for n in unreached[:5])
    return flags + (" ..." if len(unreached) > 5 else "")


def refuse_stateful(first: Any, second: Any, *, model: str = "the model") -> None:
    """Refuses unless two calls of a model on the same inputs, same weights, agree.

    A model that keeps state between calls (a streaming model's context or recurrent
    state, a counter) gives each weight sample the state the previous one left: the
    spread of its samples mixes that drift with the posterior's.

    Args:
        first: The output of one call.
        second: The output of the same call again.
        model: How the message names the model.

    Raises:
        InputError: If the outputs differ beyond rounding.

    Example:
        >>> refuse_stateful(torch.ones(2), torch.ones(2))
        >>> refuse_stateful(torch.ones(2), torch.full((2,), 1.1))
        Traceback (most recent call last):
        ...
        bnnify.errors.InputError: the model gives another output when called again on the ...
    """
    a, b = _tensors(first), _tensors(second)
    same = len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if not same:
        raise InputError(
            f"{model} gives another output when called again on the same inputs with the "
            "same weights: it keeps state between calls (a streaming model's context, a "
            "recurrent state), so each weight sample would see the state the previous one "
            "left, and the spread of the predictions would not be the posterior's",
            hint="Save a model whose forward depends only on its inputs (reset or pass the "
            "state explicitly, as an input).",
        )


def refuse_not_one_tensor(output: Any, *, model: str = "the model") -> None:
    """Refuses unless a model returned one tensor (what fit and predict take per example).

    A multi-head model (a detector's boxes and scores) returns a tuple: which of its
    outputs the likelihood and the predictive spread are about is not bnnify's guess.

    Args:
        output: What the model returned.
        model: How the message names the model.

    Raises:
        InputError: Describing what it returned.

    Example:
        >>> refuse_not_one_tensor(torch.ones(2))
        >>> refuse_not_one_tensor((torch.ones(2, 4), torch.ones(2, 2)))
        Traceback (most recent call last):
        ...
        bnnify.errors.InputError: the model returns a tuple of 2 (tensor (2, 4), tensor (2, 2)), ...
    """
    if isinstance(output, Tensor):
        return
    if isinstance(output, (list, tuple)):
        parts = [
            f"tensor {tuple(item.shape)}" if isinstance(item, Tensor) else type(item).__name__
            for item in output[:5]
        ]
        more = ", ..." if len(output) > 5 else ""
        what = f"a {type(output).__name__} of {len(output)} ({', '.join(parts)}{more})"
    else:
        what = f"a {type(output).__name__}"
    raise InputError(
        f"{model} returns {what}, not one tensor: fit and predict need the one output "
        "the likelihood and the predictive spread are about",
        hint="Save a model whose forward returns that one tensor (a subclass or wrapper "
        "that picks it), as TorchScript, torch.export, or an `arch`.",
    )


def _close(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    a, b = a.detach().double(), b.detach().double()
    bound = _REPEAT_TOLERANCE * a.abs().clamp_min(1.0)
    same = ((a - b).abs() <= bound) | (a == b) | (a.isnan() & b.isnan())
    return bool(same.all())


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []
