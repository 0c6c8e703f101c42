"""Which parameters of a module become Bayesian: discovery, tying, include/exclude."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from bnnify.errors import InvalidArgumentError, UsageError

__all__ = ["Entry", "collect_parameters", "linear_pairs", "matches", "select"]


@dataclass(eq=False)
class Entry:
    """One distinct `nn.Parameter` of a module, under all the names it is reachable by."""

    param: torch.Tensor | None
    aliases: list[str]
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)
    store: int | None = None
    index: int | None = None
    slot: object = None

    @property
    def name(self) -> str:
        return self.aliases[0]


def collect_parameters(module: nn.Module) -> list[Entry]:
    """Distinct parameters of `module` in registration order; tied ones appear once."""
    entries: dict[int, Entry] = {}
    seen_owners: set[tuple[int, str]] = set()
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for attr, param in owner._parameters.items():
            if param is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            entry = entries.setdefault(id(param), Entry(param, []))
            if name not in entry.aliases:
                entry.aliases.append(name)
            if (id(owner), attr) not in seen_owners:
                seen_owners.add((id(owner), attr))
                entry.owners.append((owner, attr))
    if not entries:
        raise UsageError(
            f"{type(module).__name__} has no parameters to reparametrize",
            hint="Pass a module with at least one nn.Parameter.",
        )
    return list(entries.values())


def _patterns(value: str | Sequence[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else list(value)
    bad = [p for p in patterns if not isinstance(p, str) or not p]
    if bad:
        raise InvalidArgumentError(f"{what} patterns must be non-empty strings, got {bad!r}")
    return patterns


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether `name` matches one of the glob `patterns` (case-insensitive, `*` spans dots).

    Case-insensitive because naming habits differ between code bases (`LayerNorm`,
    `conv1_BN`, `ln_1`): `*norm*` and `*bn*` must catch them all.

    Example:
        >>> matches("blocks.0.LayerNorm.weight", ["*norm*"])
        True
    """
    folded = name.casefold()
    return any(fnmatch.fnmatchcase(folded, pattern.casefold()) for pattern in patterns)


def select(
    entries: list[Entry],
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
) -> list[Entry]:
    """Floating-point entries matching an `include` pattern (default all) and no `exclude`."""
    include_patterns = _patterns(include, "include")
    exclude_patterns = _patterns(exclude, "exclude") or []
    chosen = []
    for entry in entries:
        if not entry.param.is_floating_point():
            continue
        if include_patterns is not None and not any(
            matches(a, include_patterns) for a in entry.aliases
        ):
            continue
        if any(matches(a, exclude_patterns) for a in entry.aliases):
            continue
        chosen.append(entry)
    if not chosen:
        names = [e.name for e in entries]
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise UsageError(
            f"no parameter matches include={include_patterns!r} exclude={exclude_patterns!r}",
            hint=f"Parameter names: {shown}.",
        )
    return chosen


def linear_pairs(
    module: nn.Module, entries: list[Entry]
) -> dict[nn.Linear, tuple[Entry, Entry | None]]:
    """`nn.Linear` layers whose weight (and bias) can use the local reparameterization trick.

    A layer qualifies when its weight is selected and used by this layer only (not
    tied), and its bias is either deterministic (not selected: zero variance is all
    the trick needs) or selected, untied and of the weight's dtype and device.
    """
    by_id = {id(e.param): e for e in entries}
    pairs = {}
    for layer in {id(m): m for m in module.modules()}.values():
        if type(layer) is not nn.Linear:
            continue
        weight = by_id.get(id(layer._parameters.get("weight")))
        bias_param = layer._parameters.get("bias")
        bias = by_id.get(id(bias_param)) if bias_param is not None else None
        if weight is None or len(weight.owners) != 1:
            continue
        if bias is not None and len(bias.owners) != 1:
            continue
        if bias is not None and (bias.param.dtype, bias.param.device) != (
            weight.param.dtype,
            weight.param.device,
        ):
            continue
        pairs[layer] = (weight, bias)
    return pairs
