"""bnnify: turn saved PyTorch models into Bayesian neural networks (Bayes by Backprop).

`bnnify.convert`, `fit`, `calibrate`, `predict`, `plot`, `kl`, `inspect`, `export` and
`prune` (see `bnnify.api`) are loaded on first use: `import bnnify` itself does not import
torch.
"""

from __future__ import annotations

from typing import Any

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
    "__version__",
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

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        from bnnify import api

        return getattr(api, name)
    raise AttributeError(f"module 'bnnify' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
