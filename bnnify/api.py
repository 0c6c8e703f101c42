"""The Python API: one function per command of the `bnnify` tool, and what each returns.

Example:
    >>> import bnnify
    >>> bnnify.convert is convert
    True
"""

from bnnify.usecases.convert import ConversionResult, ParameterSummary, convert
from bnnify.usecases.export import ExportResult, export
from bnnify.usecases.fit import FitResult, FitSettings, fit
from bnnify.usecases.inspect import InspectResult, ParameterStats, inspect
from bnnify.usecases.kl import KLResult, kl
from bnnify.usecases.predict import PredictionResult, predict
from bnnify.usecases.prune import PruneResult, prune

__all__ = [
    "ConversionResult",
    "ExportResult",
    "FitResult",
    "FitSettings",
    "InspectResult",
    "KLResult",
    "ParameterStats",
    "ParameterSummary",
    "PredictionResult",
    "PruneResult",
    "convert",
    "export",
    "fit",
    "inspect",
    "kl",
    "predict",
    "prune",
]
