"""Which tensors of a model become Bayesian: name patterns, module kinds, default buffers."""

from __future__ import annotations

import glob
from collections.abc import Iterable, Mapping
from typing import Any

from bnnify.bnn.collect import matches
from bnnify.bnn.kinds import parameter_kinds
from bnnify.errors import UsageError
from bnnify.formats.model_files import LoadedModel, TensorMeta
from bnnify.formats.spec import ConversionSpec
from bnnify.formats.tree import default_deterministic

__all__ = ["choose_tensors", "left_out_by_kind"]


def left_out_by_kind(
    spec: ConversionSpec, names: Iterable[str], types: Mapping[str, str] | None, what: str
) -> set[str]:
    """The parameter names that the spec's `only` and `skip` module kinds leave out.

    Args:
        spec: The resolved spec.
        names: The parameter names (every alias of tied ones).
        types: Module path -> qualified class name (`LoadedModel.module_types()`), or
            None when the model does not say.
        what: The model, for messages ("model.pt (state_dict)").

    Raises:
        UsageError: If `only` or `skip` is given and the module types are unknown.
    """
    if spec.only is None and not spec.skip:
        return set()
    if types is None:
        flags = " ".join(
            f"--{key} {','.join(kinds)}"
            for key, kinds in (("only", spec.only), ("skip", spec.skip))
            if kinds
        )
        raise UsageError(
            f"{flags}: module kinds are unknown in {what}, which holds tensors by name "
            "without saying which module (of what class) holds each",
            hint="Choose tensors by name with --include/--exclude (e.g. --exclude '*norm*'), "
            "or give the architecture (arch: in the spec, with --arch), or convert the "
            "model's TorchScript or torch.export file.",
        )
    kinds = parameter_kinds(names, types)
    return {
        name
        for name, kind in kinds.items()
        if (spec.only is not None and kind.value not in spec.only) or kind.value in spec.skip
    }


def choose_tensors(model: LoadedModel, spec: ConversionSpec) -> tuple[dict[str, list[str]], list]:
    """Splits the tensors into variational ones (with their tied aliases) and the rest.

    Raises:
        UsageError: If no tensor is left to reparametrize, or `only`/`skip` are given
            for a model whose module types are unknown.
    """
    include, exclude = spec.include, list(spec.exclude)
    what = f"{model.path.name} ({model.format.value})"
    parameters = [n for n in model.names() if model.meta(n).kind != "buffer"]
    exclude += [
        glob.escape(n) for n in left_out_by_kind(spec, parameters, model.module_types(), what)
    ]
    ties = model.ties()
    variational: dict[str, list[str]] = {}
    deterministic = []
    for name in model.names():
        canonical = ties.get(name, name)
        if canonical in variational:
            variational[canonical].append(name)
        elif canonical == name and not _keep(name, model.meta(name), include, exclude):
            variational[name] = [name]
        else:
            deterministic.append(name)
    if not variational:
        shown = ", ".join(model.names()[:12])
        raise UsageError(
            f"no tensor to reparametrize with include={include!r} exclude={list(spec.exclude)!r}"
            + "".join(f" {k}={v!r}" for k, v in (("only", spec.only), ("skip", spec.skip)) if v),
            hint=f"Tensor names: {shown}.",
        )
    return variational, deterministic


def _keep(name: str, meta: TensorMeta, include: Any, exclude: list[str]) -> bool:
    """Whether tensor `name` stays deterministic (see the README's default exclude list)."""
    if not meta.dtype.is_floating_point or meta.kind == "buffer":
        return True
    explicit = include is not None and matches(name, include)
    if meta.kind == "unknown" and default_deterministic(name, meta) and not explicit:
        return True
    return (include is not None and not explicit) or matches(name, exclude)
