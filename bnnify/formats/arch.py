"""Builds the `nn.Module` named by a spec's `arch: "package.module:callable"`."""

from __future__ import annotations

import importlib
import json
import shlex
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from bnnify.errors import FormatError, SpecError, UnsafeInputError, UsageError

__all__ = ["arch_flags", "build_arch", "confirm_arch", "load_strict"]


def confirm_arch(
    recorded: str,
    recorded_kwargs: Mapping[str, Any],
    arch: str | None,
    arch_kwargs: str | Mapping[str, Any] | None,
    *,
    where: str,
) -> None:
    """Refuses to build the architecture a file names unless the user repeated it.

    A spec file or a checkpoint is data: it must not choose on its own which code runs
    (importing a module runs it, and `arch: "os:system"` with `arch_kwargs: {command:
    ...}` runs a shell command). The caller passes what the user typed: `arch` must be
    the recorded name and `arch_kwargs` (a JSON object, or a mapping) the recorded
    keyword arguments, compared as canonical JSON (`1` and `1.0` differ, key order does
    not matter). `arch_kwargs` may be left out when none are recorded. Nothing is
    imported here.

    Args:
        recorded: The `package.module:callable` the file names.
        recorded_kwargs: The keyword arguments the file gives it.
        arch: The user's confirmation of `recorded` (`--arch`).
        arch_kwargs: The user's confirmation of `recorded_kwargs` (`--arch-kwargs`).
        where: The file that names the architecture, for messages.

    Raises:
        UnsafeInputError: The confirmation is missing or differs (exit code 3).
        UsageError: `arch_kwargs` is not a JSON object.

    Example:
        >>> confirm_arch("m:build", {"n": 2}, "m:build", '{"n": 2}', where="spec.yaml")
        >>> print(arch_flags("m:build", {"n": 2}))
        --arch m:build --arch-kwargs '{"n": 2}'
    """
    expected = _canonical(recorded_kwargs)
    given = expected if arch_kwargs is None and not recorded_kwargs else None
    if arch_kwargs is not None:
        given = _canonical(_parse_kwargs(arch_kwargs))
    if arch == recorded and given == expected:
        return
    if arch is None:
        problem = "which a file alone cannot authorize"
    elif arch != recorded:
        problem = f"but --arch confirms {arch!r}"
    elif arch_kwargs is None:
        problem = f"with arch_kwargs {expected}, which --arch-kwargs must repeat"
    else:
        problem = f"with arch_kwargs {expected}, but --arch-kwargs gives {given}"
    raise UnsafeInputError(
        f"{where} names the architecture {recorded!r}: building it imports and runs that "
        f"code, {problem}",
        hint=f"If you trust it, confirm with {arch_flags(recorded, recorded_kwargs)}",
    )


def arch_flags(arch: str, kwargs: Mapping[str, Any]) -> str:
    """The command-line flags confirming `arch` and `kwargs`, quoted for a POSIX shell."""
    flags = f"--arch {shlex.quote(arch)}"
    if kwargs:
        flags += f" --arch-kwargs {shlex.quote(json.dumps(dict(kwargs), sort_keys=True))}"
    return flags


def _parse_kwargs(value: str | Mapping[str, Any]) -> Any:
    if not isinstance(value, str):
        return dict(value)
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError) as error:
        raise UsageError(
            f"--arch-kwargs is not valid JSON ({error}): {value[:200]!r}",
            hint="Give a JSON object, such as '{\"hidden\": 32}'.",
        ) from None
    if not isinstance(parsed, dict):
        raise UsageError(
            f"--arch-kwargs must be a JSON object, got {value[:200]!r}",
            hint="Give a JSON object, such as '{\"hidden\": 32}'.",
        )
    return parsed


def _canonical(kwargs: Any) -> str:
    try:
        return json.dumps(kwargs, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        raise UsageError(f"arch keyword arguments are not plain JSON: {kwargs!r:.200}") from None


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
