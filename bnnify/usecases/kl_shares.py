"""How the KL of a conversion is shared: the tensors that dominate it, those that look fixed."""

from __future__ import annotations

import fnmatch
import glob
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bnnify.bnn.collect import matches
from bnnify.formats.tree import BUFFER_LIKE_PATTERNS
from bnnify.usecases import LOGGER_NAME

__all__ = [
    "RATIO",
    "TOP",
    "KLShare",
    "buffer_like",
    "exclude_flags",
    "largest",
    "percent",
    "warn_buffer_like",
]

logger = logging.getLogger(LOGGER_NAME)

# Tensors listed as carrying the most KL.
TOP = 3
# A tensor whose share of the KL is this many times its share of the elements is out of
# scale with the rest: values far from the prior (a table near 1000, frequencies in Hz).
RATIO = 10.0


@dataclass(frozen=True)
class KLShare:
    """One tensor's part of a conversion's KL.

    Attributes:
        name: The parameter.
        kl: Its KL.
        share: Its fraction of the total KL.
        elements_share: Its fraction of the Bayesian elements.
        reasons: Why it looks like a fixed tensor (a buffer) rather than a weight.
    """

    name: str
    kl: float
    share: float
    elements_share: float
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (`reasons` only when there are some)."""
        data = {
            "name": self.name,
            "kl": self.kl,
            "share": self.share,
            "elements_share": self.elements_share,
        }
        return data | ({"reasons": list(self.reasons)} if self.reasons else {})


def percent(fraction: float) -> str:
    """A fraction as a percentage with three significant digits ("97.3%", "0.0027%")."""
    return f"{100 * fraction:.3g}%"


def _shares(parameters: Sequence[Any]) -> list[KLShare]:
    total = sum(max(p.kl, 0.0) for p in parameters)
    elements = sum(p.numel for p in parameters)
    return [
        KLShare(
            p.name,
            p.kl,
            p.kl / total if total > 0 else 0.0,
            p.numel / elements if elements else 0.0,
        )
        for p in parameters
    ]


def largest(parameters: Sequence[Any], top: int = TOP) -> list[KLShare]:
    """The `top` parameters carrying the most KL, largest first (of `ParameterSummary`s)."""
    shares = sorted(_shares(parameters), key=lambda s: (-s.kl, s.name))
    return shares[:top]


def buffer_like(parameters: Sequence[Any]) -> list[KLShare]:
    """The parameters that look like fixed tensors: by name, or by a KL out of scale.

    Meant for models whose files do not say what is a buffer (state dicts without an
    architecture): a name matching `BUFFER_LIKE_PATTERNS`, or a share of the KL at
    least `RATIO` times the share of the elements.
    """
    found = []
    for share in _shares(parameters):
        reasons = [
            f"its name matches {pattern!r}"
            for pattern in BUFFER_LIKE_PATTERNS
            if matches(share.name, [pattern])
        ][:1]
        if share.elements_share > 0 and share.share >= RATIO * share.elements_share:
            reasons.append(
                f"{percent(share.share)} of the KL with {percent(share.elements_share)} of the "
                "elements"
            )
        if reasons:
            found.append(KLShare(share.name, share.kl, share.share, share.elements_share, reasons))
    return found


def exclude_flags(suspects: Sequence[KLShare], names: Sequence[str]) -> list[str]:
    """`--exclude` patterns dropping exactly `suspects` among `names`.

    Suspects sharing a last name component ("*.frequencies") get one pattern when it
    matches no other parameter; the others are named exactly (glob-escaped).
    """
    chosen = {s.name for s in suspects}
    patterns, covered = [], set()
    for suspect in suspects:
        if suspect.name in covered:
            continue
        leaf = suspect.name.rpartition(".")[2]
        pattern = "*." + glob.escape(leaf)
        caught = {n for n in names if fnmatch.fnmatchcase(n.casefold(), pattern.casefold())}
        if "." in suspect.name and len(caught) > 1 and caught <= chosen:
            patterns.append(pattern)
            covered |= caught
        else:
            patterns.append(glob.escape(suspect.name))
            covered.add(suspect.name)
    return patterns


def warn_buffer_like(suspects: Sequence[KLShare], flags: Sequence[str], source: str) -> None:
    """One warning naming the suspects, why, and the `--exclude` flags that drop them."""
    if not suspects:
        return
    listed = "; ".join(f"{s.name} ({', '.join(s.reasons)})" for s in suspects[:8])
    more = f" and {len(suspects) - 8} more" if len(suspects) > 8 else ""
    command = " ".join(f"--exclude '{flag}'" for flag in flags)
    logger.warning(
        "%s does not say which tensors are buffers, and %d made Bayesian look like fixed "
        "tensors rather than trained weights: %s%s. If they are fixed, convert again with %s "
        "(or give the architecture: arch)",
        source,
        len(suspects),
        listed,
        more,
        command,
    )
