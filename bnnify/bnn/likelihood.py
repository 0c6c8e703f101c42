"""Likelihoods p(y | f(x)) for fitting: Gaussian with a learned noise scale, categorical."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnnify.enums import Task
from bnnify.errors import InputError

__all__ = ["CategoricalLikelihood", "GaussianLikelihood", "Likelihood"]

_LOG_2PI = math.log(2 * math.pi)


class Likelihood(nn.Module):
    """Base class: the negative log-likelihood of targets given model outputs."""

    task: Task

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-example negative log-likelihood, shape `(batch,)`."""
        raise NotImplementedError

    def check(self, output: Tensor, target: Tensor) -> None:
        """Raises `InputError` if `output` and `target` do not fit this likelihood."""


class GaussianLikelihood(Likelihood):
    """y ~ N(f(x), s^2) with a learned homoscedastic noise scale s = exp(log_noise).

    Args:
        noise: Initial noise scale (> 0).
    """

    task = Task.REGRESSION

    def __init__(self, noise: float = 1.0):
        super().__init__()
        self.log_noise = nn.Parameter(torch.tensor(math.log(noise)))

    @property
    def noise(self) -> Tensor:
        return self.log_noise.exp()

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        output = output.reshape(output.shape[0], -1)
        target = target.reshape(target.shape[0], -1).to(output.dtype)
        z = (target - output) / self.noise.to(output.dtype)
        per_dim = 0.5 * z.square() + self.log_noise.to(output.dtype) + 0.5 * _LOG_2PI
        return per_dim.sum(1)

    def check(self, output: Tensor, target: Tensor) -> None:
        out = output.reshape(output.shape[0], -1).shape[1]
        tgt = target.reshape(target.shape[0], -1).shape[1]
        if out != tgt:
            raise InputError(
                f"the model gives {out} output(s) per example but the targets have {tgt}",
                hint="Regression needs one target column per model output.",
            )


class CategoricalLikelihood(Likelihood):
    """y ~ Categorical(softmax(f(x))): the model outputs logits, the targets are classes."""

    task = Task.CLASSIFICATION

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target.long(), reduction="none")

    def check(self, output: Tensor, target: Tensor) -> None:
        if output.dim() != 2:
            raise InputError(
                f"classification needs logits of shape (batch, classes); the model gives "
                f"{tuple(output.shape)}"
            )
        if target.is_floating_point() and not torch.equal(target, target.round()):
            raise InputError(
                "classification targets must be class indices (integers)",
                hint="Use --task regression for real-valued targets.",
            )
        classes = output.shape[1]
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= classes:
            raise InputError(
                f"class indices must lie in [0, {classes - 1}] for a model with {classes} "
                f"outputs; found {low}..{high}"
            )
