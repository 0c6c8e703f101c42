"""Small models beyond one `(batch, features)` input, for the fit and predict tests.

Importable by name, so that a state dict of one converts and runs with
`--arch multi_input_models:masked_regressor` (the tests' folder is on `sys.path`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "CachedWeight",
    "MaskedRegressor",
    "RateModel",
    "Streaming",
    "TwoHeads",
    "masked_regressor",
    "mlp",
    "token_classifier",
]


class MaskedRegressor(nn.Module):
    """`forward(x, mask)`: a hidden layer whose units `mask` (one per example) switches."""

    def __init__(self, features: int = 3, hidden: int = 8):
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inp(x)) * mask)


def masked_regressor(features: int = 3, hidden: int = 8) -> MaskedRegressor:
    return MaskedRegressor(features, hidden)


class RateModel(nn.Module):
    """`forward(x, sr: int)`, as silero-vad's TorchScript model: a constant changes the path."""

    def __init__(self, features: int = 2, hidden: int = 8):
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: Tensor, sr: int) -> Tensor:
        h = torch.tanh(self.inp(x))
        if sr == 16000:
            h = 2.0 * h
        return self.out(h)


def token_classifier(features: int = 4, hidden: int = 8, classes: int = 3) -> nn.Sequential:
    """Per-token logits `(batch, tokens, classes)` from `(batch, tokens, features)`."""
    return nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def mlp(features: int = 8, hidden: int = 16) -> nn.Sequential:
    """A plain MLP: every Bayesian weight in an nn.Linear of row-wise layers."""
    return nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, 1))


class CachedWeight(nn.Module):
    """Reads a transposed copy of its weight made in `__init__`, never `lin.weight` itself."""

    def __init__(self, cached: bool = True):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.cached = cached
        self.weight_t = self.lin.weight.detach().t()

    def forward(self, x: Tensor) -> Tensor:
        weight_t = self.weight_t if self.cached else self.lin.weight.t()
        return x @ weight_t + self.lin.bias


class Streaming(nn.Module):
    """Keeps a count of its calls and adds it to its output, as streaming models keep context."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        self.calls.add_(1.0)
        return self.lin(x) + 0.1 * self.calls


class TwoHeads(nn.Module):
    """Returns a tuple (boxes, scores), as detectors such as MTCNN's P-, R- and O-Net do."""

    def __init__(self, features: int = 3):
        super().__init__()
        self.boxes = nn.Linear(features, 4)
        self.scores = nn.Linear(features, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.boxes(x), torch.softmax(self.scores(x), dim=1)
