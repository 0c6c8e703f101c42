"""The Python API: one function per command of the `bnnify` tool, and what each returns.

Example:
    >>> import bnnify
    >>> bnnify.convert is convert
    True
"""

from bnnify.usecases.calibrate import CalibrationResult, calibrate
from bnnify.usecases.convert import ConversionResult, ParameterSummary, convert
from bnnify.usecases.export import ExportResult, export
from bnnify.usecases.fit import FitResult, FitSettings, fit
from bnnify.usecases.inspect import InspectResult, ParameterStats, inspect
from bnnify.usecases.kl import KLResult, kl
from bnnify.usecases.plot import PlotResult, plot
from bnnify.usecases.predict import PredictionResult, predict
from bnnify.usecases.prune import PruneResult, prune

__all__ = [
    "CalibrationResult",
    "ConversionResult",
    "ExportResult",
    "FitResult",
    "FitSettings",
    "InspectResult",
    "KLResult",
    "ParameterStats",
    "ParameterSummary",
    "PlotResult",
    "PredictionResult",
    "PruneResult",
    "calibrate",
    "convert",
    "export",
    "fit",
    "inspect",
    "kl",
    "plot",
    "predict",
    "prune",
]
