"""Likelihoods p(y | f(x)) for fitting: Gaussian with a learned noise scale, categorical."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnnify.enums import Task
from bnnify.errors import InputError

__all__ = [
    "CategoricalLikelihood",
    "GaussianLikelihood",
    "Likelihood",
    "class_labels",
    "classes_last",
]

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
    """y ~ Categorical(softmax(f(x))): the model outputs logits, the targets are classes.

    Logits of shape `(batch, ..., classes)` (the classes along `class_dim`, by default
    the last) give one categorical per position: per-token or per-pixel classes. An
    example's negative log-likelihood sums over its positions. Labels have the
    logits' shape without the classes (see `class_labels`).

    Args:
        class_dim: The dimension of the classes in the model's output (0 is the batch).
    """

    task = Task.CLASSIFICATION

    def __init__(self, class_dim: int = -1):
        super().__init__()
        self.class_dim = class_dim

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        logits = classes_last(output, self.class_dim)
        labels = class_labels(logits, target, check_values=False)
        classes = logits.shape[-1]
        per_position = F.cross_entropy(
            logits.reshape(-1, classes), labels.reshape(-1).long(), reduction="none"
        )
        return per_position.reshape(output.shape[0], -1).sum(1)

    def check(self, output: Tensor, target: Tensor) -> None:
        class_labels(classes_last(output, self.class_dim), target)


def classes_last(logits: Tensor, class_dim: int = -1, *, leading: int = 0) -> Tensor:
    """`logits` with their class dimension moved last (a view).

    Args:
        logits: Model outputs `(batch, ...)`, after `leading` dimensions (samples).
        class_dim: The dimension of the classes in a model output (0 is the batch;
            negative counts from the end).
        leading: Dimensions before the model output's (1 for stacked samples).

    Raises:
        InputError: If the output has no class dimension, or `class_dim` is not one
            of its dimensions besides the batch.

    Example:
        >>> classes_last(torch.zeros(2, 5, 7, 7), class_dim=1).shape   # segmentation
        torch.Size([2, 7, 7, 5])
    """
    dims = logits.dim() - leading
    if dims < 2:
        raise InputError(
            f"classification needs logits of shape (batch, ..., classes); the model gives "
            f"{tuple(logits.shape[leading:])}",
            hint="Use --task regression for a model with one output per example.",
        )
    if isinstance(class_dim, bool) or not isinstance(class_dim, int):
        raise InputError(f"the class dimension must be an integer, got {class_dim!r}")
    if not -dims < class_dim < dims or class_dim == 0:
        raise InputError(
            f"class dimension {class_dim} is not a dimension of outputs of shape "
            f"{tuple(logits.shape[leading:])} besides the batch (0)",
            hint=f"Choose --class-dim between 1 and {dims - 1}, or -1 for the last.",
        )
    position = class_dim % dims + leading
    return logits if position == logits.dim() - 1 else logits.movedim(position, -1)


def class_labels(logits: Tensor, labels: Tensor, *, check_values: bool = True) -> Tensor:
    """`labels` of the leading shape of `logits` `(..., C)`: one class index per position.

    Labels of that shape plus a trailing 1 (`(n, 1)` for logits `(n, C)`) lose it; any
    other shape is refused, never broadcast.

    Args:
        logits: Logits or probabilities with the classes last.
        labels: Class indices.
        check_values: Also check that the labels are integers in `[0, C)` (reads them).

    Raises:
        InputError: For labels of another shape, none at all, or (with
            `check_values`) values that are no class index.
    """
    lead, classes = logits.shape[:-1], logits.shape[-1]
    if labels.dim() == len(lead) + 1 and labels.shape[-1] == 1:
        labels = labels.squeeze(-1)
    if labels.shape != lead:
        raise InputError(
            f"labels of shape {tuple(labels.shape)} do not match predictions of shape "
            f"{tuple(logits.shape)}",
            hint=f"Give one class index per prediction, labels of shape {tuple(lead)}.",
        )
    if not check_values:
        return labels
    if labels.numel() == 0:
        raise InputError("there are no examples to score")
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise InputError(
            "classification targets must be class indices (integers)",
            hint="Use --task regression for real-valued targets.",
        )
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise InputError(
            f"class indices must lie in [0, {classes - 1}] for a model with {classes} "
            f"outputs; found {low}..{high}"
        )
    return labels
