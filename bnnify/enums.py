"""String options shared by the library, the spec, the Python API and the CLI (torch-free)."""

from __future__ import annotations

from enum import Enum
from typing import Any

from bnnify.errors import InvalidArgumentError, closest

__all__ = [
    "ExportFormat",
    "Figure",
    "KLMethod",
    "ModuleKind",
    "NoiseMode",
    "PruneScope",
    "Reduction",
    "Task",
]


class _Choice(str, Enum):
    """A `str` enum whose members print as their value ("regression", not "Task.REGRESSION")."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    @classmethod
    def parse(cls, value: Any) -> Any:
        """The member named by `value` (case-insensitive).

        Raises:
            ValueError: (`InvalidArgumentError`) Listing the valid words.
        """
        words = [member.value for member in cls]
        key = value.lower() if isinstance(value, str) else value
        if key not in words:
            raise InvalidArgumentError(
                f"invalid {cls.__name__.lower()} {value!r}.{closest(str(key), words)}",
                hint=f"Choose one of: {', '.join(words)}.",
            )
        return cls(key)


class Task(_Choice):
    """What `fit` and `predict` model: the likelihood of the targets."""

    REGRESSION = "regression"
    CLASSIFICATION = "classification"


class Reduction(_Choice):
    """How a KL divergence is reduced over the elements of the parameters."""

    SUM = "sum"
    MEAN = "mean"


class KLMethod(_Choice):
    """How a KL divergence was computed."""

    ANALYTIC = "analytic"
    MONTE_CARLO = "monte_carlo"


class NoiseMode(_Choice):
    """How a training step draws its weight noise.

    `fresh`: new standard normals for every weight at every step (the default).
    `shifted`: one buffer of standard normals, read at every step under a fresh
    random cyclic shift and fresh random signs (`bnnify.bnn.noise.ShiftedNoise`).
    """

    FRESH = "fresh"
    SHIFTED = "shifted"


class ModuleKind(_Choice):
    """Kinds of modules, chosen with `--only` and `--skip` (`bnnify.bnn.kinds` maps classes).

    A parameter has the kind of the outermost module of a known kind holding it
    (`MultiheadAttention`'s output projection is `attention`), else `other`.
    """

    LINEAR = "linear"
    CONV = "conv"
    NORM = "norm"
    EMBEDDING = "embedding"
    RNN = "rnn"
    ATTENTION = "attention"
    OTHER = "other"


class ExportFormat(_Choice):
    """The file format of a plain model written by `export` (and `prune --export`)."""

    STATE_DICT = "state_dict"
    SAFETENSORS = "safetensors"
    TORCHSCRIPT = "torchscript"
    EXPORT = "export"


class PruneScope(_Choice):
    """Over which weights `prune --keep` ranks the signal-to-noise ratios."""

    GLOBAL = "global"
    LAYER = "layer"


class Figure(_Choice):
    """The figures `bnnify plot` draws (the first two from a checkpoint, the rest from a
    predictions file)."""

    LAYERS = "layers"
    SIGMA = "sigma"
    RELIABILITY = "reliability"
    COVERAGE = "coverage"
    BANDS = "bands"
