"""Module trees rebuilt from the flat names of a state dict, and which tensors stay fixed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from bnnify.bnn.collect import matches
from bnnify.errors import FormatError, InvalidArgumentError, UsageError

__all__ = [
    "BUFFER_LIKE_PATTERNS",
    "DEFAULT_BUFFER_PATTERNS",
    "StateDictTree",
    "build_tree",
    "default_deterministic",
]

# Glob patterns (case-insensitive, whole dotted names, as --include/--exclude) of floating-point
# tensors that models keep as buffers: they are not trained, so they stay deterministic.
DEFAULT_BUFFER_PATTERNS: tuple[str, ...] = (
    # BatchNorm / InstanceNorm statistics, updated by forward passes, not by gradients.
    "*running_mean",
    "*running_var",
    # BatchNorm's step counter (an integer already, listed for float checkpoints).
    "*num_batches_tracked",
    # Hugging Face transformers: the arange of position indices (BERT, RoBERTa, CLIP...).
    "*.position_ids",
    # Rotary position embeddings' inverse frequencies (LLaMA, GPT-NeoX, Mistral...).
    "*.inv_freq",
    # Cached cos/sin tables of older rotary embedding implementations.
    "*.cos_cached",
    "*.sin_cached",
    # GPT-2's causal masks (lower-triangular ones) in old checkpoints. Not "*attn.bias":
    # that would also match `c_attn.bias`, the query/key/value projection's bias.
    "*.attn.bias",
    "*.crossattention.bias",
    # ...and the large negative value GPT-2 fills masked scores with.
    "*.attn.masked_bias",
    "*.crossattention.masked_bias",
)


# Names that often belong to fixed tensors (bases, tables, masks, windows) but also to
# trained weights: a conversion warns about them instead of keeping them fixed.
BUFFER_LIKE_PATTERNS: tuple[str, ...] = (
    "*basis*",  # STFT, DCT or radial bases ("stft.basis", "mel_basis")
    "*stft*",  # an STFT as a fixed convolution ("stft_conv.weight")
    "*freq*",  # fixed frequencies of an expansion ("rbf.frequencies", "freqs")
    "*window*",  # analysis windows ("filterbank.window_")
    "*mask*",  # attention or padding masks
    "*table*",  # lookup tables
    "*buffer*",  # named for what they are ("pos_buffer", "ema_buffer")
)


class StateDictTree(nn.Module):
    """The module `build_tree` returns: it holds tensors but has no forward computation."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise UsageError(
            "a module rebuilt from a state dict holds tensors but has no forward computation",
            hint="Load the model's architecture to run it (a spec's `arch:`), or save it as "
            "TorchScript or torch.export.",
        )


def default_deterministic(name: str, tensor_or_meta: Any) -> bool:
    """Whether a tensor of a state dict stays as it is by default (not made Bayesian).

    A state dict does not say what is a parameter: non-floating-point tensors (integer,
    boolean and complex) and names matching `DEFAULT_BUFFER_PATTERNS` stay fixed.

    Args:
        name: The tensor's dotted name in the state dict.
        tensor_or_meta: Anything with a `dtype` (a tensor, a `TensorMeta`).

    Example:
        >>> import torch
        >>> default_deterministic("bn.running_var", torch.ones(3))
        True
        >>> default_deterministic("fc.weight", torch.ones(3))
        False
    """
    if not tensor_or_meta.dtype.is_floating_point:
        return True
    return matches(name, DEFAULT_BUFFER_PATTERNS)


def build_tree(tensors: Mapping[str, Tensor], parameters: Iterable[str]) -> StateDictTree:
    """Builds modules mirroring the dotted names of `tensors`, sharing their memory.

    `"encoder.layers.0.weight"` becomes submodules `encoder`, `layers` and `0` holding
    `weight`. The names in `parameters` become `nn.Parameter`s (trainable when
    floating-point), the others persistent buffers, so that the tree's `state_dict()`
    has exactly the keys of `tensors` and `named_parameters()` exactly `parameters`.
    Tensors that share memory (tied weights) stay separate entries.

    Args:
        tensors: Tensors by dotted name, in the order the tree lists them.
        parameters: The names that become parameters.

    Raises:
        InvalidArgumentError: If `parameters` names a tensor that is not in `tensors`.
        FormatError: If a name is malformed or is both a tensor and a module ("a" and
            "a.b"), or uses an attribute name of `nn.Module` ("eval").

    Example:
        >>> import torch
        >>> tree = build_tree({"fc.weight": torch.ones(2, 3), "bn.running_mean": torch.zeros(2)},
        ...                   ["fc.weight"])
        >>> [name for name, _ in tree.named_parameters()]
        ['fc.weight']
        >>> list(tree.state_dict())
        ['fc.weight', 'bn.running_mean']
    """
    chosen = set(parameters)
    unknown = sorted(chosen - tensors.keys())
    if unknown:
        raise InvalidArgumentError(
            f"{len(unknown)} parameter names are not tensors of the state dict: {unknown[:5]}",
            hint="Choose parameters among the state dict's keys.",
        )
    root = StateDictTree()
    for name, tensor in tensors.items():
        *path, leaf = _split(name)
        owner = root
        for depth, part in enumerate(path):
            owner = _child(owner, part, name, ".".join(path[: depth + 1]), tensors)
        _attach(owner, leaf, tensor.detach(), name in chosen, name, tensors)
    return root


def _split(name: str) -> list[str]:
    parts = name.split(".") if isinstance(name, str) else [""]
    if "" in parts:
        raise FormatError(
            f"invalid tensor name {name!r}: empty component",
            hint="State dict keys are dotted names such as 'encoder.layer.0.weight'.",
        )
    return parts


def _child(owner: nn.Module, part: str, name: str, prefix: str, tensors: Mapping) -> nn.Module:
    child = owner._modules.get(part)
    if child is not None:
        return child
    if prefix in tensors:
        raise _clash(prefix, name)
    try:
        owner.add_module(part, nn.Module())
    except KeyError:
        raise _reserved(part, name) from None
    return owner._modules[part]


def _attach(
    owner: nn.Module, leaf: str, tensor: Tensor, parameter: bool, name: str, tensors: Mapping
) -> None:
    if leaf in owner._modules:
        other = next(key for key in tensors if key.startswith(name + "."))
        raise _clash(name, other)
    try:
        if parameter:
            trainable = tensor.is_floating_point() or tensor.is_complex()
            owner.register_parameter(leaf, nn.Parameter(tensor, requires_grad=trainable))
        else:
            owner.register_buffer(leaf, tensor)
    except KeyError:
        raise _reserved(leaf, name) from None


def _clash(tensor_name: str, other: str) -> FormatError:
    return FormatError(
        f"tensor names {tensor_name!r} and {other!r} clash: {tensor_name!r} would be both a "
        "tensor and a module",
        hint="A state dict's names must form a tree; rename or drop one of the tensors.",
    )


def _reserved(part: str, name: str) -> FormatError:
    return FormatError(
        f"tensor name {name!r}: {part!r} is an attribute of torch.nn.Module",
        hint="Rename the tensor in the state dict (for example with a name prefix).",
    )
