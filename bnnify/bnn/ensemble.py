"""One module from K weight sets of a model: it returns the mean and spread of their outputs.

`Ensemble` runs K copies of the model one after the other (TorchScript compiles it);
`StackedEnsemble` holds the K weight sets stacked on a first dimension and runs them
through one copy, batched with `torch.func.vmap` or in a loop (for `torch.export`).
Both reduce the K outputs with `ensemble_moments`, whose spread is computed as
`bnnify.bnn.metrics.regression_summary` computes the epistemic one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

__all__ = ["Ensemble", "StackedEnsemble", "ensemble_moments"]


def ensemble_moments(outputs: Tensor, softmax: bool, noise: float) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation over the first dimension (the K members) of `outputs`.

    The deviation divides by K (the spread of these K outputs, not an estimate of a
    larger population's). `softmax` first turns each member's logits (last dimension)
    into probabilities; a `noise` > 0 adds noise^2 to the variance (the aleatoric part
    of a regression model's predictive).

    Example:
        >>> mean, std = ensemble_moments(torch.tensor([[1.0], [3.0]]), False, 0.0)
        >>> mean.tolist(), std.tolist()
        ([2.0], [1.0])
    """
    if softmax:
        outputs = torch.softmax(outputs, -1)
    variance = outputs.var(0, unbiased=False)
    if noise > 0.0:
        variance = variance + noise * noise
    return outputs.mean(0), variance.sqrt()


class Ensemble(nn.Module):
    """K modules of one architecture, each with its own weights, run in turn.

    Args:
        members: The K modules (TorchScript modules, or modules TorchScript can compile).
        softmax: Average probabilities (softmax over the last dimension), not logits.
        noise: Aleatoric standard deviation added in quadrature (0: epistemic only).
    """

    def __init__(self, members: Sequence[nn.Module], softmax: bool = False, noise: float = 0.0):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.softmax = softmax
        self.noise = noise

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        outputs: list[Tensor] = []
        for member in self.members:
            outputs.append(member(x))
        return ensemble_moments(torch.stack(outputs), self.softmax, self.noise)


class StackedEnsemble(nn.Module):
    """One module run with K weight sets, stacked on a first dimension of size K.

    Args:
        base: The module; its other tensors (buffers, deterministic parameters) serve
            every member.
        weights: Parameter name -> its K values, stacked (tied names may share one).
        batched: Run the K sets in one `vmap` pass; else one after the other.
        softmax: Average probabilities (softmax over the last dimension), not logits.
        noise: Aleatoric standard deviation added in quadrature (0: epistemic only).
    """

    def __init__(
        self,
        base: nn.Module,
        weights: Mapping[str, Tensor],
        *,
        batched: bool = True,
        softmax: bool = False,
        noise: float = 0.0,
    ):
        super().__init__()
        self.base = base
        self.names = list(weights)
        self.batched = batched
        self.softmax = softmax
        self.noise = noise
        self.count = next(iter(weights.values())).shape[0]
        for i, name in enumerate(self.names):
            # Buffer names cannot hold dots: the parameter names are kept in `names`.
            self.register_buffer(f"weights_{i}", weights[name])

    def stacked(self) -> list[Tensor]:
        return [getattr(self, f"weights_{i}") for i in range(len(self.names))]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        stacked = self.stacked()

        def member(*values: Tensor) -> Tensor:
            return functional_call(self.base, dict(zip(self.names, values, strict=True)), (x,))

        if self.batched:
            outputs = vmap(member)(*stacked)
        else:
            outputs = torch.stack([member(*(w[k] for w in stacked)) for k in range(self.count)])
        return ensemble_moments(outputs, self.softmax, self.noise)
