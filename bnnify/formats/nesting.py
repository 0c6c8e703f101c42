"""Where the state dict sits in a checkpoint dict: found in common layouts, or chosen by key.

Training scripts save more than weights: `{"model_state": ..., "optimizer_state": ...,
"step": ...}`, `{"model": {"state_dict": ..., "model_args": ...}, "optimizer": ...}`,
Lightning's `{"state_dict": ..., "hyper_parameters": ..., "callbacks": ...}`, or a model
beside its moving average (`{"model": ..., "ema": ...}`). `find_state_dict` looks for
dicts of tensors under string keys (at most `MAX_DEPTH` levels down), skipping the
training state beside the model (keys naming an optimizer, a scheduler, a gradient
scaler, callbacks or loops). One found is used, and its key said; several are refused
with the list, to be chosen with `key` (`--key a.b`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from bnnify.errors import FormatError, UnknownNameError, closest, shorten

__all__ = ["MAX_DEPTH", "TRAINING_STATE", "WRAPPER_PREFIXES", "Found", "find_state_dict"]

logger = logging.getLogger("bnnify")

MAX_DEPTH = 4
# Substrings of the keys holding training state: tensors, but not the model's.
TRAINING_STATE = ("optim", "sched", "scaler", "callback", "loops")
# Prefixes that wrappers add before every name: DataParallel and DistributedDataParallel
# (and EMA wrappers holding the model as `.module`), torch.compile's `_orig_mod`.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_KEY_HINT = "Choose the state dict with --key (key=...), a dotted path such as model.state_dict."


@dataclass(frozen=True)
class Found:
    """The state dict (or trusted module) of a checkpoint and where it was.

    Attributes:
        value: The dict of tensors (non-tensor entries included), or an `nn.Module`.
        key: Its dotted path in the checkpoint; None for the top level.
        prefix: The wrapper prefix removed from every name ("module."), if any.
    """

    value: Any
    key: str | None
    prefix: str | None


def find_state_dict(content: Any, source: str, key: str | None = None) -> Found:
    """The state dict inside the loaded content of a `torch.save` file.

    A top level holding tensors is the state dict. Otherwise the dicts of tensors
    below it are searched (see the module docstring): one is used, several are refused.
    Names all starting with one of `WRAPPER_PREFIXES` lose it (as `load_state_dict` of
    the unwrapped model expects), and `prefix` says so.

    Args:
        content: What `torch.load` returned.
        source: The file, for messages.
        key: A dotted path choosing the state dict ("model.state_dict"); the longest
            key matching at each level is taken, so keys holding dots work too.

    Raises:
        UnknownNameError: `key` names nothing in the checkpoint.
        FormatError: No state dict is found, several are (without `key`), or `key`
            names something that holds no tensors.
    """
    if key is not None:
        value = _follow(content, key, source)
        if not _holds_tensors(value) and not isinstance(value, nn.Module):
            raise FormatError(
                f"'{source}': {key!r} holds a {type(value).__name__} without tensors",
                hint=_listing(content) + " " + _KEY_HINT,
            )
        return _stripped(value, key, source)
    if isinstance(content, nn.Module):
        return Found(content, None, None)
    if not isinstance(content, dict):
        raise FormatError(
            f"'{source}' holds a {type(content).__name__}, not a state dict",
            hint="Save the weights with torch.save(model.state_dict(), path).",
        )
    if _holds_tensors(content):
        nested = [path for path in _candidates(content, ()) if path]
        if nested:
            logger.warning(
                "%s holds tensors at its top level, used as the state dict, and more under %s; "
                "choose with --key",
                source,
                ", ".join(repr(_dotted(p)) for p in nested[:5]),
            )
        return _stripped(content, None, source)
    found = list(_candidates(content, ()))
    if len(found) != 1:
        raise FormatError(
            f"'{source}' holds {_counted(found)}; its top-level keys are "
            f"{_keys(content)}" + (f": {_described(content, found)}" if found else ""),
            hint=_KEY_HINT
            if found
            else "Save the weights themselves: "
            "torch.save(model.state_dict(), path), or name them with --key.",
        )
    path = _dotted(found[0])
    logger.info("%s: using the state dict under %r", source, path)
    return _stripped(_get(content, found[0]), path, source)


def _candidates(value: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    if isinstance(value, nn.Module):
        yield path
        return
    if not isinstance(value, dict):
        return
    if path and _holds_tensors(value):
        yield path
        return
    if len(path) >= MAX_DEPTH:
        return
    for name, item in value.items():
        if isinstance(name, str) and not any(t in name.casefold() for t in TRAINING_STATE):
            yield from _candidates(item, (*path, name))


def _holds_tensors(value: Any) -> bool:
    return isinstance(value, dict) and any(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()
    )


def _follow(content: Any, key: str, source: str) -> Any:
    """The value at dotted `key`, taking at each level the longest key that matches."""
    parts, value, walked = key.split("."), content, []
    while parts:
        if not isinstance(value, dict):
            where = _dotted(walked) or "the top level"
            raise UnknownNameError(
                f"'{source}': --key {key!r}: {where} holds a {type(value).__name__}, not keys",
                hint=_listing(content),
            )
        for size in range(len(parts), 0, -1):
            name = ".".join(parts[:size])
            if name in value:
                value, walked, parts = value[name], [*walked, name], parts[size:]
                break
        else:
            where = f"under {_dotted(walked)!r}" if walked else "at the top level"
            names = [str(k) for k in value if isinstance(k, str)]
            raise UnknownNameError(
                f"'{source}': --key {key!r}: no key {parts[0]!r} {where}; the keys there are "
                f"{shorten(names[:20], 300)}." + closest(parts[0], names),
                hint=_listing(content),
            )
    return value


def _stripped(value: Any, key: str | None, source: str) -> Found:
    if isinstance(value, nn.Module):
        return Found(value, key, None)
    names = [k for k, v in value.items() if isinstance(k, str) and isinstance(v, Tensor)]
    removed = ""
    for prefix in WRAPPER_PREFIXES * 2:  # both, in either order: "module._orig_mod."
        if names and all(n.startswith(prefix) for n in names):
            names = [n[len(prefix) :] for n in names]
            removed += prefix
    if not removed:
        return Found(value, key, None)
    logger.info("%s: removed the wrapper prefix %r from every tensor name", source, removed)
    renamed = {
        (k[len(removed) :] if isinstance(k, str) and isinstance(v, Tensor) else k): v
        for k, v in value.items()
    }
    return Found(renamed, key, removed)


def _get(content: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        content = content[name]
    return content


def _dotted(path: Any) -> str:
    return ".".join(path)


def _counted(found: list) -> str:
    if not found:
        return "no state dict (no dict of tensors under its keys)"
    return f"{len(found)} state dicts"


def _described(content: Any, found: list[tuple[str, ...]]) -> str:
    parts = []
    for path in found[:10]:
        value = _get(content, path)
        size = (
            "a module"
            if isinstance(value, nn.Module)
            else f"{sum(isinstance(v, Tensor) for v in value.values())} tensors"
        )
        parts.append(f"{_dotted(path)!r} ({size})")
    return ", ".join(parts)


def _keys(content: Any) -> str:
    if not isinstance(content, dict):
        return f"none (it holds a {type(content).__name__})"
    return shorten([str(k) for k in content][:20], 300)


def _listing(content: Any) -> str:
    found = list(_candidates(content, ())) if isinstance(content, dict) else []
    if not found:
        return f"Its top-level keys are {_keys(content)}."
    return f"State dicts found in it: {_described(content, found)}."
