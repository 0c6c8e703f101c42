"""How a model's `forward` is called: its per-example inputs by name and its constant arguments.

The signature of `forward` is read from the model itself: the schema of a TorchScript
method, the call structure a `torch.export` program was exported with, or the Python
signature of an `nn.Module`. Each input goes to the parameter of its name; inputs whose
name `forward` does not have fill its first parameters left, in the order given (so one
input "x" suits `forward(self, input)`). Constant arguments (`--model-arg sr=16000`) go
to the parameter of their name, unchanged in every batch.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bnnify.errors import InvalidArgumentError, shorten
from bnnify.formats.model_files import LoadedModel, ModelFormat
from bnnify.formats.model_inputs import Inputs
from bnnify.formats.spec import parse_key_values
from bnnify.usecases import LOGGER_NAME

__all__ = [
    "ForwardSignature",
    "ModelCall",
    "Parameter",
    "call_of",
    "forward_signature",
    "model_arguments",
]

logger = logging.getLogger(LOGGER_NAME)

# Scalar constants a flag or a spec can carry (YAML scalars).
_CONSTANT_TYPES = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class Parameter:
    """A parameter of `forward` (after `self`)."""

    name: str
    required: bool
    keyword_only: bool = False


@dataclass(frozen=True)
class ForwardSignature:
    """The parameters of a model's `forward`, and whether it takes `*args`/`**kwargs`."""

    parameters: tuple[Parameter, ...]
    var_positional: bool = False
    var_keyword: bool = False

    def __str__(self) -> str:
        names = [p.name if p.required else f"{p.name}=..." for p in self.parameters]
        names += ["*args"] * self.var_positional + ["**kwargs"] * self.var_keyword
        return f"forward({', '.join(names)})"


def forward_signature(module: Any, program: Any = None) -> ForwardSignature:
    """The signature of `module.forward` (`program`: the `ExportedProgram` it came from).

    A TorchScript module gives its schema; a module unlifted from an export program
    takes exactly the positional and keyword arguments it was exported with; any other
    module its Python signature. An unreadable one takes anything, in order.
    """
    if isinstance(module, torch.jit.ScriptModule):
        schema = module.forward.schema
        return ForwardSignature(
            tuple(
                Parameter(a.name, not a.has_default_value(), bool(a.kwarg_only))
                for a in schema.arguments[1:]
            )
        )
    try:
        python = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return ForwardSignature((), var_positional=True, var_keyword=True)
    kinds = inspect.Parameter
    if program is not None:
        # Every argument the program was exported with is required, as it was given.
        args_spec, kwargs_spec = program.call_spec.in_spec.children()
        names = [p.name for p in python.parameters.values()]
        positional = names[: args_spec.num_children]
        keywords = list(kwargs_spec.context or [])
        return ForwardSignature(
            tuple(Parameter(n, True) for n in positional)
            + tuple(Parameter(n, True, keyword_only=True) for n in keywords)
        )
    parameters = tuple(
        Parameter(p.name, p.default is kinds.empty, p.kind is kinds.KEYWORD_ONLY)
        for p in python.parameters.values()
        if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
    )
    kinds_seen = {p.kind for p in python.parameters.values()}
    return ForwardSignature(
        parameters, kinds.VAR_POSITIONAL in kinds_seen, kinds.VAR_KEYWORD in kinds_seen
    )


class ModelCall:
    """Binds a batch of `Inputs` and constant arguments to a model's `forward`.

    Args:
        signature: The signature of `forward`.
        constants: Constant arguments by name (YAML scalars: numbers, booleans,
            strings, null), passed unchanged with every batch.

    Raises:
        InvalidArgumentError: For a constant that is no scalar, or that `forward` has
            no parameter for.

    Example:
        >>> signature = ForwardSignature((Parameter("x", True), Parameter("sr", True)))
        >>> call = ModelCall(signature, {"sr": 16000})
        >>> args, kwargs = call.bind(Inputs({"audio": torch.zeros(2, 4)}))
        >>> [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args], kwargs
        ([(2, 4), 16000], {})
        >>> call.describe(["audio"])
        {'x': 'input audio', 'sr': 16000}
    """

    def __init__(self, signature: ForwardSignature, constants: Mapping[str, Any] | None = None):
        self.signature = signature
        self.constants = dict(constants or {})
        names = {p.name for p in signature.parameters}
        for key, value in self.constants.items():
            if not isinstance(value, _CONSTANT_TYPES):
                raise InvalidArgumentError(
                    f"model argument {key!r} is a {type(value).__name__}; constants are "
                    "numbers, booleans, strings or null",
                    hint="Pass per-example tensors as inputs, not as model arguments.",
                )
            if key not in names and not signature.var_keyword:
                raise InvalidArgumentError(
                    f"the model's {signature} has no parameter {key!r} for --model-arg "
                    f"{key}={shorten(value)}",
                    hint=f"Its parameters: {_listed(signature)}.",
                )
        self._plans: dict[tuple[str, ...], tuple[list[tuple], dict[str, tuple]]] = {}

    def bind(self, inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The positional and keyword arguments of `forward` for this batch."""
        names = tuple(inputs.names)
        plan = self._plans.get(names)
        if plan is None:
            plan = self._plans[names] = self._plan(names)
        positional, keywords = plan

        def value(entry: tuple) -> Any:
            return inputs.tensors[entry[1]] if entry[0] == "input" else entry[1]

        return tuple(value(e) for e in positional), {k: value(e) for k, e in keywords.items()}

    def describe(self, names: list[str]) -> dict[str, Any]:
        """What each parameter of `forward` receives: `"input NAME"` or a constant."""
        positional, keywords = self._plans.get(tuple(names)) or self._plan(tuple(names))
        described = {}
        parameters = [p.name for p in self.signature.parameters]
        for index, entry in enumerate(positional):
            key = parameters[index] if index < len(parameters) else f"*args[{index}]"
            described[key] = f"input {entry[1]}" if entry[0] == "input" else entry[1]
        for key, entry in keywords.items():
            described[key] = f"input {entry[1]}" if entry[0] == "input" else entry[1]
        return described

    def _plan(self, names: tuple[str, ...]) -> tuple[list[tuple], dict[str, tuple]]:
        signature = self.signature
        given: dict[str, tuple] = {k: ("constant", v) for k, v in self.constants.items()}
        parameters = {p.name: p for p in signature.parameters}
        leftover = []
        for name in names:
            if name in given:
                raise InvalidArgumentError(
                    f"{name!r} is given both as an input tensor and as a model argument",
                    hint="Give it once.",
                )
            if name in parameters:
                given[name] = ("input", name)
            else:
                leftover.append(name)
        free = [p.name for p in signature.parameters if p.name not in given and not p.keyword_only]
        extra = []
        for name in leftover:
            if free:
                given[free.pop(0)] = ("input", name)
            elif signature.var_positional:
                extra.append(("input", name))
            else:
                raise InvalidArgumentError(
                    f"the model's {signature} has no parameter left for input {name!r}",
                    hint=f"Name the inputs after its parameters ({_listed(signature)}), "
                    "e.g. --input-key x --input-key mask, or --input-key ARG=TENSOR.",
                )
        positional: list[tuple] = []
        keywords: dict[str, tuple] = {}
        in_order = True
        for parameter in signature.parameters:
            entry = given.pop(parameter.name, None)
            if entry is None:
                if parameter.required:
                    raise InvalidArgumentError(
                        f"the model's {signature} needs {parameter.name!r}, which is given "
                        f"neither as an input nor as a model argument (inputs: "
                        f"{', '.join(names)})",
                        hint=f"Add the tensor with --input-key {parameter.name} (or "
                        f"{parameter.name}=TENSOR), or a constant with --model-arg "
                        f"{parameter.name}=VALUE.",
                    )
                in_order = False  # later ones go by keyword, the default stays
            elif in_order and not parameter.keyword_only:
                positional.append(entry)
            else:
                keywords[parameter.name] = entry
        if extra and not in_order:
            raise InvalidArgumentError(
                f"inputs {[e[1] for e in extra]} would follow a parameter left to its default "
                f"in the model's {signature}",
                hint="Give every parameter before them.",
            )
        keywords.update(given)  # constants for **kwargs
        plan = (positional + extra, keywords)
        logger.info("Calling the model's %s with %s", signature, self._text(plan))
        return plan

    @staticmethod
    def _text(plan: tuple[list[tuple], dict[str, tuple]]) -> str:
        def text(entry: tuple) -> str:
            return f"input {entry[1]!r}" if entry[0] == "input" else repr(entry[1])

        parts = [text(e) for e in plan[0]] + [f"{k}={text(e)}" for k, e in plan[1].items()]
        return ", ".join(parts)


def model_arguments(values: Mapping[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    """Constant arguments from a mapping or `NAME=VALUE` strings (YAML scalar values).

    Example:
        >>> model_arguments(["sr=16000", "mode=fast", "scale=0.5"])
        {'sr': 16000, 'mode': 'fast', 'scale': 0.5}

    Raises:
        SpecError: For a string without "=" or a repeated name.
    """
    if values is None:
        return {}
    if isinstance(values, Mapping):
        return dict(values)
    if isinstance(values, str):
        values = [values]
    return parse_key_values(values, "--model-arg")


def _listed(signature: ForwardSignature) -> str:
    return ", ".join(p.name for p in signature.parameters) or "none"


def call_of(
    model: LoadedModel, module: Any, model_args: Mapping[str, Any] | None = None
) -> ModelCall:
    """How `module`, the plain module of the file `model`, is called (with `model_args`)."""
    program = model.module if model.format is ModelFormat.EXPORT else None
    return ModelCall(forward_signature(module, program), model_args)
