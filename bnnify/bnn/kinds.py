"""The module classes behind each `ModuleKind`, and the kind of each parameter of a model."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from torch import nn

from bnnify.enums import ModuleKind

__all__ = ["KIND_CLASSES", "kind_of_type", "module_types", "parameter_kinds", "qualified_name"]

# Each kind and its torch.nn classes; their subclasses (torch's own, such as
# `NonDynamicallyQuantizableLinear`, the Lazy variants, and yours) are of the same kind.
KIND_CLASSES: dict[ModuleKind, tuple[type[nn.Module], ...]] = {
    ModuleKind.LINEAR: (nn.Linear, nn.Bilinear),
    ModuleKind.CONV: (
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
    ),
    ModuleKind.NORM: (
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
        nn.RMSNorm,
        nn.LocalResponseNorm,
    ),
    ModuleKind.EMBEDDING: (nn.Embedding, nn.EmbeddingBag),
    ModuleKind.RNN: (nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell),
    ModuleKind.ATTENTION: (nn.MultiheadAttention,),
}
# TorchScript names classes "__torch__.<module>.<class>", with "___torch_mangle_<n>." inserted
# when one Python class was compiled several times.
_SCRIPT_PREFIX = "__torch__."
_MANGLE = re.compile(r"___torch_mangle_\d+\.")


def qualified_name(cls: type) -> str:
    """ "module.QualName" of a class, as `module_types` and torch.export name it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def kind_of_type(name: str | None) -> ModuleKind | None:
    """The kind of the class named `name` (qualified, as `qualified_name` gives it), if known.

    Example:
        >>> kind_of_type("torch.nn.modules.linear.NonDynamicallyQuantizableLinear")
        <ModuleKind.LINEAR: 'linear'>
        >>> kind_of_type("mypackage.Block") is None
        True
    """
    if not name:
        return None
    return _known().get(_MANGLE.sub("", name.removeprefix(_SCRIPT_PREFIX)))


def module_types(module: nn.Module) -> dict[str, str]:
    """Each submodule's path ("" for `module`) and the qualified name of its class.

    A TorchScript module's submodules are named by the classes they were compiled
    from (`torch.nn.modules.linear.Linear`), read from the compiled type.
    """
    types = {}
    for path, child in module.named_modules(remove_duplicate=False):
        if isinstance(child, torch_script_module()):
            # The compiled type keeps the Python class's qualified name; there is no
            # public accessor besides `original_name`, which drops the module path.
            raw = getattr(getattr(child, "_c", None), "qualified_name", child.original_name)
            name = _MANGLE.sub("", raw.removeprefix(_SCRIPT_PREFIX))
        else:
            name = qualified_name(type(child))
        types[path] = name
    return types


def parameter_kinds(names: Iterable[str], types: Mapping[str, str]) -> dict[str, ModuleKind]:
    """The kind of each parameter name, from the types of the modules on its path.

    The outermost module of a known kind decides (attention's projections are
    `attention`, not `linear`); a parameter under no known kind is `other`.

    Args:
        names: Dotted parameter names ("encoder.0.weight").
        types: Module path -> qualified class name (see `module_types`).
    """
    kinds = {}
    for name in names:
        parts = name.split(".")[:-1]
        kinds[name] = ModuleKind.OTHER
        for depth in range(len(parts) + 1):
            kind = kind_of_type(types.get(".".join(parts[:depth])))
            if kind is not None:
                kinds[name] = kind
                break
    return kinds


def torch_script_module() -> type:
    """`torch.jit.ScriptModule` (looked up late: `torch.jit` is heavy to import)."""
    import torch.jit

    return torch.jit.ScriptModule


def _known() -> dict[str, ModuleKind]:
    """Qualified class name -> kind, for the kinds' classes and their loaded subclasses."""
    known: dict[str, ModuleKind] = {}
    for kind, classes in KIND_CLASSES.items():
        stack = list(classes)
        while stack:
            cls = stack.pop()
            known.setdefault(qualified_name(cls), kind)
            stack += cls.__subclasses__()
    return known
