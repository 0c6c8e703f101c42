"""Builds the `nn.Module` named by a spec's `arch: "package.module:callable"`."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from bnnify.errors import FormatError, SpecError

__all__ = ["build_arch", "load_strict"]


def build_arch(arch: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Imports `package.module:callable` and calls it with `kwargs`.

    This runs the user's code: naming an architecture in the spec is the opt-in.

    Raises:
        SpecError: If the module or callable cannot be found, the call fails, or it
            does not return an `nn.Module`.
    """
    module_name, _, attr = arch.partition(":")
    if not module_name or not attr:
        raise SpecError(
            f"arch {arch!r} is not of the form 'package.module:callable'",
            hint="For example arch: 'torchvision.models:resnet18'.",
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise SpecError(
            f"arch {arch!r}: cannot import module {module_name!r} ({error})",
            hint="Install the package or add its folder to PYTHONPATH.",
        ) from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise SpecError(f"arch {arch!r}: {module_name!r} has no attribute {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise SpecError(f"arch {arch!r} is not callable")
    try:
        module = target(**dict(kwargs or {}))
    except Exception as error:  # user code: report any failure as a spec problem
        raise SpecError(
            f"arch {arch!r} failed with arch_kwargs {dict(kwargs or {})!r}: "
            f"{type(error).__name__}: {error}"
        ) from None
    if not isinstance(module, nn.Module):
        raise SpecError(f"arch {arch!r} returned {type(module).__name__}, not an nn.Module")
    return module


def load_strict(module: nn.Module, tensors: Mapping[str, Tensor], arch: str) -> None:
    """Loads a state dict into `module`, refusing missing, unexpected or misshapen tensors.

    Raises:
        FormatError: Listing what does not match.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(tensors[k].shape)} vs arch {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise FormatError(
            f"the state dict does not match arch {arch!r}; " + "; ".join(parts),
            hint="Check arch and arch_kwargs against the model that saved the file.",
        )
    module.load_state_dict(dict(tensors), strict=True)
