"""Which estimator `predict_samples` uses, and the structural proof that allows the faster one.

The local reparameterization trick samples each `nn.Linear` layer's pre-activations
per input row instead of sampling its weights. For each example, that is exactly
the predictive distribution of weight sampling *if every row of every Linear input
is one example*: the model must map a `(batch, features)` input row by row, with no
reshape that turns one example into several rows (per-token models, DeepSets,
attention heads) and nothing that mixes rows (batch statistics, `x - x.mean(0)`).
Arbitrary `forward` code cannot be inspected, so the proof is structural: the model
is an `nn.Sequential` (possibly nested) of layers known to act row by row, each
used once, with no hooks, fed one 2-D tensor. Anything else samples weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from torch import Tensor, nn

__all__ = [
    "Estimator",
    "EstimatorChoice",
    "batch_refusal",
    "choose_estimator",
    "rowwise_refusal",
]


class Estimator(str, Enum):
    """How `BayesianModule.predict_samples` draws its samples."""

    WEIGHT_SAMPLING = "weight_sampling"
    """One forward pass per sample, every weight drawn from its posterior."""
    LOCAL_REPARAMETERIZATION = "local_reparameterization"
    """One batched pass: each Linear's pre-activations drawn per row (per example)."""
    POSTERIOR_MEAN = "posterior_mean"
    """Inside `mean_weights()`: every sample is the output of the posterior means."""
    FROZEN_SAMPLE = "frozen_sample"
    """Inside `frozen_sample()`: every sample reuses one weight sample."""


@dataclass(frozen=True)
class EstimatorChoice:
    """The estimator `predict_samples` will use for given inputs, and why.

    Attributes:
        estimator: The estimator.
        reason: One sentence a user can act on (what allowed or refused the trick).
    """

    estimator: Estimator
    reason: str

    def __str__(self) -> str:
        return f"{self.estimator.value} ({self.reason})"


def choose_estimator(
    modes: tuple[str, bool, bool],
    batch_refusal: Callable[[], str | None],
    module: nn.Module,
    inputs: Sequence[Any],
    kwargs: Mapping[str, Any] | None = None,
) -> EstimatorChoice:
    """The estimator of `BayesianModule.predict_samples` (see `predictive_estimator`).

    Args:
        modes: The sampler's mode ("sample" or "mean"), whether the weights are fixed
            (a frozen sample or given weights), and whether the user turned local
            reparameterization on.
        batch_refusal: Why the Bayesian parameters do not allow one batched pass.
        module: The wrapped module.
        inputs: Its positional inputs.
        kwargs: Its keyword arguments.
    """
    mode, frozen, local = modes
    if mode != "sample":
        return EstimatorChoice(Estimator.POSTERIOR_MEAN, "inside mean_weights()")
    if frozen:
        return EstimatorChoice(
            Estimator.FROZEN_SAMPLE, "inside frozen_sample() or given_weights(): fixed weights"
        )
    if local:
        return EstimatorChoice(
            Estimator.LOCAL_REPARAMETERIZATION,
            "local_reparameterization=True: the user asserts that rows are independent "
            "examples; Linear layers fed 2-D inputs sample their pre-activations",
        )
    refusal = batch_refusal() or rowwise_refusal(module, inputs, kwargs)
    if refusal is not None:
        return EstimatorChoice(Estimator.WEIGHT_SAMPLING, refusal)
    return EstimatorChoice(
        Estimator.LOCAL_REPARAMETERIZATION,
        "every Bayesian parameter is in an nn.Linear of an nn.Sequential of row-wise "
        "layers fed (batch, features): the same distribution per example",
    )


def batch_refusal(
    store_slots: Sequence[Sequence[tuple[Any, Any]]], lrt_ends: Sequence[int], slots: Sequence[Any]
) -> str | None:
    """Why the Bayesian parameters do not allow one batched local-trick pass, or None.

    Args:
        store_slots: Per flat store, its `(index, slot)` pairs in storage order.
        lrt_ends: Per store, the end of its leading range of local-trick slots.
        slots: Every reparametrized slot.
    """
    for k, pairs in enumerate(store_slots):
        if len(pairs) != lrt_ends[k]:
            name = pairs[lrt_ends[k]][1].name
            return f"{name!r} is not the weight or bias of a plain nn.Linear used once"
    for slot in slots:
        if slot.store is None:
            return f"{slot.name!r} has a posterior that is not stored flat"
    return None


# Layers that compute each output row from the same input row alone, whatever their
# mode; the checks below add those whose behaviour depends on arguments or mode.
_ELEMENTWISE = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Softplus,
    nn.Softsign,
    nn.Softshrink,
    nn.Hardshrink,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Threshold,
    # Independent masks per element: rows stay independent in training mode too.
    nn.Dropout,
    nn.AlphaDropout,
)


def rowwise_refusal(
    module: nn.Module, inputs: Sequence[Any], kwargs: Mapping[str, Any] | None = None
) -> str | None:
    """Why `module(*inputs, **kwargs)` is not provably row-wise, or None when it is.

    Row-wise means: `inputs` is one 2-D tensor `(batch, features)` and there are no
    keyword arguments (a second input, or a constant, reaches code that is not an
    `nn.Sequential`, which cannot be inspected), and each output row depends on the
    same input row only, through layers each called once.

    Example:
        >>> import torch
        >>> mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> rowwise_refusal(mlp, [torch.zeros(5, 3)]) is None
        True
        >>> rowwise_refusal(mlp, [torch.zeros(5, 2, 3)])
        'the input has shape (5, 2, 3), not (batch, features)'
    """
    if kwargs:
        return f"the model is given keyword arguments ({', '.join(kwargs)}), not one tensor"
    if len(inputs) != 1 or not isinstance(inputs[0], Tensor):
        return f"the model is given {len(inputs)} inputs, not one tensor"
    if inputs[0].dim() != 2:
        return f"the input has shape {tuple(inputs[0].shape)}, not (batch, features)"
    seen: set[int] = set()
    for name, layer in _layers(module, ""):
        label = f"{type(layer).__name__} {name!r}" if name else type(layer).__name__
        if id(layer) in seen:
            return f"{label} is used twice in one pass (its two uses share weights)"
        seen.add(id(layer))
        refusal = _hooked(layer) or _layer_refusal(layer)
        if refusal is not None:
            return f"{label} {refusal}"
    return None


def _layers(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """The layers a (nested) `nn.Sequential` runs, in order; other modules as leaves."""
    if type(module) is not nn.Sequential:
        yield prefix, module
        return
    yield prefix, module  # its own hooks count too
    # What Sequential.forward runs: _modules, duplicates included (named_children skips them).
    for name, child in module._modules.items():
        if child is not None:
            yield from _layers(child, f"{prefix}.{name}" if prefix else name)


def _hooked(layer: nn.Module) -> str | None:
    hooks = (layer._forward_hooks, layer._forward_pre_hooks)
    if any(len(h) for h in hooks) or "forward" in layer.__dict__:
        return "has forward hooks or a replaced forward, which may mix rows"
    return None


def _layer_refusal(layer: nn.Module) -> str | None:
    """Why this layer is not known to act row by row on a 2-D input, or None."""
    kind = getattr(type(layer), "_bnnify_base", type(layer))  # bnnify's Linear subclass
    if kind is nn.Sequential or kind in _ELEMENTWISE or kind is nn.Linear:
        return None
    if kind in (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.GLU):
        return None if layer.dim in (1, -1) else f"acts along dim={layer.dim}, across rows"
    if kind in (nn.LayerNorm, nn.RMSNorm):
        shape = tuple(layer.normalized_shape)
        return None if len(shape) == 1 else f"normalizes over {shape}, across rows"
    if kind is nn.GroupNorm:
        return None
    if kind is nn.BatchNorm1d:
        if layer.training or layer.running_mean is None:
            return "normalizes with the statistics of the batch (training mode), across rows"
        return None
    if kind is nn.Flatten:
        if layer.start_dim in (1, -1) and layer.end_dim in (1, -1):
            return None
        return f"flattens dims {layer.start_dim}..{layer.end_dim}, merging rows"
    return (
        "is not a layer known to act row by row (its forward may reshape or mix rows)"
        if not isinstance(layer, nn.Sequential)
        else "is a subclass of nn.Sequential with its own forward"
    )
