"""Validation of each key of a conversion spec, raising `SpecError` with the key path."""

from __future__ import annotations

import inspect
import keyword
import math
import re
import reprlib
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import torch

from bnnify.bnn.posteriors import init_function
from bnnify.bnn.registry import Factory
from bnnify.enums import ModuleKind
from bnnify.errors import BnnifyError, SpecError, clip, closest

__all__ = [
    "DTYPES",
    "check_arch",
    "check_arch_kwargs",
    "check_component",
    "check_device",
    "check_dtype",
    "check_keys",
    "check_kinds",
    "check_patterns",
    "check_seed",
    "fail",
    "show",
    "wrong_type",
]

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
_COMPONENT_KEYS = ("name", "kwargs")
_MAX_NODES = 10_000
_MAX_DEPTH = 50
_SEED_LIMIT = 2**64
_ARCH_HINT = 'Name the function that builds the model, e.g. arch: "mypackage.models:build".'

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlong = 3, 80, 80, 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6


def show(value: Any) -> str:
    """A bounded repr: documents may be huge, deep or self-referential."""
    return _repr.repr(value)


def _kind_of(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if value is None:
        return "null"
    if type(value) in names:
        return names[type(value)]
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def fail(source: str, path: str, problem: str, hint: str | None = None) -> NoReturn:
    """Raises `SpecError("<source>: <path>: <problem>", hint=hint)`."""
    if not path.isprintable():
        path = ascii(path)  # keys are user text: no terminal control characters
    where = f"{source}: {path}" if path else source
    raise SpecError(f"{where}: {problem}", hint=hint)


def wrong_type(
    source: str, path: str, value: Any, expected: str, hint: str | None = None
) -> NoReturn:
    """Raises a `SpecError` saying what was expected at `path` and quoting `value`."""
    fail(source, path, f"expected {expected}, got {_kind_of(value)} {show(value)}", hint)


def check_keys(mapping: Mapping, allowed: Sequence[str], source: str, path: str = "") -> None:
    """Refuses non-string and unknown keys, suggesting the closest allowed one."""
    for key in mapping:
        if not isinstance(key, str):
            fail(source, path, f"keys must be strings, got {_kind_of(key)} {show(key)}")
        if key not in allowed:
            fail(
                source,
                path,
                f"unknown key {key!r}.{closest(key, allowed)}",
                hint=f"Allowed keys{f' of {path}' if path else ''}: {', '.join(allowed)}.",
            )


def check_component(value: Any, kind: str, factory: Factory, source: str) -> tuple[str, dict]:
    """A posterior or prior as (canonical name, kwargs), built once on a dummy tensor.

    Args:
        value: A registered name or a mapping `{name: ..., kwargs: {...}}`.
        kind: "posterior" or "prior" (the key path).
        factory: `PosteriorFactory` or `PriorFactory`.
        source: The file name used in error messages.
    """
    form = f"a {kind} name or a mapping {{name: ..., kwargs: {{...}}}}"
    if isinstance(value, Mapping):
        check_keys(value, _COMPONENT_KEYS, source, kind)
        if "name" not in value:
            fail(source, kind, f"missing 'name' in {show(value)}", hint=f"Write {form}.")
        name, kwargs = value["name"], value.get("kwargs")
    elif isinstance(value, str):
        name, kwargs = value, None
    else:
        wrong_type(source, kind, value, form, hint=f"Registered {kind}s: {_names(factory)}.")
    name = _registered(name, kind, factory, source)
    kwargs = _kwargs(kwargs, f"{kind}.kwargs", source)
    try:
        cls = factory[name]
    except BnnifyError as error:  # a registered factory function that fails
        fail(source, kind, error.message, error.hint)
    accepted = _accepted(kind, cls)
    for key in kwargs:
        if accepted is not None and key not in accepted:
            fail(
                source,
                f"{kind}.kwargs.{key}",
                f"unknown argument {key!r} for {kind} {name!r}.{closest(key, accepted)}",
                hint=_accepts(kind, name, accepted),
            )
    with torch.random.fork_rng(devices=[]):
        try:
            # What `get_posterior` and `get_prior` do, minus their TypeError rewording.
            cls.from_param(torch.zeros(3), **kwargs)
        # Registered classes may be user code: any ordinary failure means bad arguments.
        except (BnnifyError, TypeError, ValueError, ArithmeticError, RuntimeError) as error:
            _build_failed(error, kind, name, kwargs, accepted, source)
    return name, kwargs


def _names(factory: Factory) -> str:
    return ", ".join(factory.names)


def _accepts(kind: str, name: str, accepted: Sequence[str]) -> str:
    return f"The {kind} {name!r} accepts: {', '.join(accepted) or 'no arguments'}."


def _registered(name: Any, kind: str, factory: Factory, source: str) -> str:
    registered = f"Registered {kind}s: {_names(factory)}."
    if not isinstance(name, str):
        wrong_type(source, f"{kind}.name", name, f"a {kind} name", hint=registered)
    key = name.strip().lower()
    if key not in factory:
        fail(source, kind, f"unknown {kind} {name!r}.{closest(key, factory.names)}", registered)
    return key


def _kwargs(value: Any, path: str, source: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        wrong_type(source, path, value, "a mapping of argument names to values")
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            fail(source, path, f"argument names must be non-empty strings, got {show(key)}")
        if not _is_scalar(item):
            expected = "a finite number, a string, a boolean or null"
            wrong_type(source, f"{path}.{key}", item, expected)
    return dict(sorted(value.items()))


def _is_scalar(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) < 2**1023  # converts to a finite float
    return (
        value is None
        or isinstance(value, (bool, str))
        or (isinstance(value, float) and math.isfinite(value))
    )


def _accepted(kind: str, cls: type) -> tuple[str, ...] | None:
    """Keyword arguments `cls` accepts, or None when it takes any (`**kwargs`)."""
    candidates = [(cls.from_param, {"param"})]
    if kind == "posterior":
        candidates = [(init_function(cls), {"param", "mu", "rho_out"})]
    if kind == "prior":
        # `Prior.from_param` forwards its **kwargs to the constructor.
        candidates.append((cls.__init__, {"self", "shape", "dtype", "device"}))
    named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for function, skip in candidates:
        try:
            params = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            return None
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return tuple(p.name for p in params if p.kind in named and p.name not in skip)
    return None


def _build_failed(
    error: Exception,
    kind: str,
    name: str,
    kwargs: dict,
    accepted: Sequence[str] | None,
    source: str,
) -> NoReturn:
    own = isinstance(error, BnnifyError)
    message = error.message if own else f"{type(error).__name__}: {error}"
    culprits = [key for key in kwargs if re.search(rf"\b{re.escape(key)}\b", message)]
    culprits = list(kwargs) if len(kwargs) == 1 else culprits
    path = f"{kind}.kwargs" + (f".{culprits[0]}" if len(culprits) == 1 else "")
    hints = [error.hint] if own and error.hint else []
    if accepted is not None:
        hints.append(_accepts(kind, name, accepted))
    given = ", ".join(f"{k}={show(v)}" for k, v in kwargs.items())
    problem = f"invalid arguments ({clip(given)}) for {kind} {name!r}: {message}"
    fail(source, path, problem, hint=" ".join(hints) or None)


def _available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        devices += ["xpu"] + [f"xpu:{i}" for i in range(xpu.device_count())]
    return devices


def check_device(value: Any, source: str, available_only: bool = True) -> str:
    """A device available on this machine, lower case ("cpu:0" becomes "cpu").

    With `available_only=False` any well-formed device passes (a recorded spec read
    on another machine).
    """
    if not isinstance(value, str):
        wrong_type(source, "device", value, 'a device name such as "cpu" or "cuda:0"')
    match = re.fullmatch(r"([a-z]+)(?::([0-9]{1,6}))?", value.strip().lower())
    available = _available_devices()
    hint = f"Available on this machine: {', '.join(available)}."
    if match is None or match[1] not in _DEVICE_TYPES:
        typed = match[1] if match else value
        suggestion = " Did you mean 'cuda'?" if typed == "gpu" else closest(typed, _DEVICE_TYPES)
        known = f"Devices are {', '.join(_DEVICE_TYPES)}, with an optional ':N' index."
        fail(
            source,
            "device",
            f"invalid device {value!r}.{suggestion} {known}",
            hint,
        )
    device = match[0]
    if match[1] in ("cpu", "mps") and match[2] in ("0", None):
        device = match[1]
    if available_only and device not in available:
        fail(source, "device", f"device {value!r} is not available on this machine", hint)
    return device


def check_dtype(value: Any, source: str) -> str | None:
    """One of the keys of `DTYPES` (case-insensitive), or None."""
    if value is None:
        return None
    choices = ", ".join([*DTYPES, "null"])
    if not isinstance(value, str):
        wrong_type(source, "dtype", value, f"one of {choices}")
    key = value.strip().lower()
    if key not in DTYPES:
        hint = f"Choose one of {choices} (null keeps the model's dtype)."
        fail(source, "dtype", f"unsupported dtype {value!r}.{closest(key, DTYPES)}", hint)
    return key


def check_patterns(value: Any, key: str, source: str) -> tuple[str, ...]:
    """A glob pattern or a list of them, as a tuple of non-empty strings."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        expected = "a glob pattern or a list of glob patterns over parameter names"
        wrong_type(source, key, value, expected, hint='For example ["*.weight", "encoder.*"].')
    for index, pattern in enumerate(value):
        if not isinstance(pattern, str) or not pattern.strip():
            wrong_type(source, f"{key}[{index}]", pattern, "a non-empty glob pattern string")
    return tuple(pattern.strip() for pattern in value)


def check_kinds(value: Any, key: str, source: str) -> tuple[str, ...]:
    """Module kinds (`ModuleKind` words) as a sorted tuple: a list, or "linear,conv"."""
    words = [member.value for member in ModuleKind]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        wrong_type(source, key, value, "a list of module kinds", hint=f"Kinds: {', '.join(words)}.")
    kinds = set()
    for index, item in enumerate(value):
        if not isinstance(item, str):
            wrong_type(source, f"{key}[{index}]", item, "a module kind such as linear")
        for word in filter(None, (part.strip().lower() for part in item.split(","))):
            if word not in words:
                fail(
                    source,
                    key,
                    f"unknown module kind {word!r}.{closest(word, words)}",
                    hint=f"Kinds: {', '.join(words)} (see the README's --only/--skip).",
                )
            kinds.add(word)
    if not kinds:
        fail(source, key, "no module kind given", hint=f"Kinds: {', '.join(words)}.")
    return tuple(word for word in words if word in kinds)


def check_seed(value: Any, source: str) -> int:
    """A non-negative integer below 2**64 (what `torch.manual_seed` accepts)."""
    if isinstance(value, bool) or not isinstance(value, int):
        wrong_type(source, "seed", value, "a non-negative integer", hint="For example seed: 0.")
    if not 0 <= value < _SEED_LIMIT:
        fail(source, "seed", f"{show(value)} is out of range", hint="Use 0 <= seed < 2**64.")
    return value


def check_arch(value: Any, source: str) -> str | None:
    """A "package.module:callable" string (syntax only, nothing is imported), or None."""
    if value is None:
        return None
    if not isinstance(value, str):
        wrong_type(source, "arch", value, 'a "package.module:callable" string', _ARCH_HINT)
    module, colon, attribute = value.strip().partition(":")
    parts = [*module.split("."), *attribute.split(".")]
    if not colon or not all(part.isidentifier() and not keyword.iskeyword(part) for part in parts):
        problem = f"invalid callable {value!r}: expected the form 'package.module:callable'"
        fail(source, "arch", problem, _ARCH_HINT)
    return value.strip()


def check_arch_kwargs(value: Any, arch: str | None, source: str) -> dict:
    """A copy of `value`: plain JSON data with string keys, given only with `arch`."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        wrong_type(source, "arch_kwargs", value, "a mapping of argument names to values")
    if arch is None and value:
        fail(source, "arch_kwargs", f"given ({show(value)}) without 'arch'", _ARCH_HINT)
    budget = [_MAX_NODES]
    kwargs = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            problem = f"argument names must be non-empty strings, got {show(key)}"
            fail(source, "arch_kwargs", problem)
        kwargs[key] = _json_value(item, f"arch_kwargs.{key}", source, budget)
    return kwargs


def _json_value(value: Any, path: str, source: str, budget: list[int], depth: int = 0) -> Any:
    """A copy of `value` if it is plain JSON data, bounded in size (aliases) and depth."""
    budget[0] -= 1
    if budget[0] < 0 or depth > _MAX_DEPTH:
        limits = f"more than {_MAX_NODES} values or {_MAX_DEPTH} levels"
        fail(source, path, f"too large: {limits}", hint="Keep arch_kwargs small.")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, (list, tuple)):
        return [
            _json_value(item, f"{path}[{i}]", source, budget, depth + 1)
            for i, item in enumerate(value)
        ]
    if isinstance(value, Mapping):
        copy = {}
        for key, item in value.items():
            if not isinstance(key, str):
                fail(source, path, f"keys must be strings, got {_kind_of(key)} {show(key)}")
            copy[key] = _json_value(item, f"{path}.{key}", source, budget, depth + 1)
        return copy
    expected = "plain data (finite numbers, strings, booleans, null, lists, mappings)"
    wrong_type(source, path, value, expected)
