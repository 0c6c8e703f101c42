"""Plain models from a posterior: the weights drawn, and the module or state dict built of them.

The weights of `export` come from the runner's `BayesianModule`, as `predict` draws
them: the posterior means, or K frozen samples drawn one after the other after
`torch.manual_seed(seed)` (so `--weights sample --seed N` is the first of
`--weights ensemble:K --seed N`, and both are the first samples `predict --seed N`
draws where it samples weights). A TorchScript model gets them installed by its
`ScriptRunner`, wherever its code reads a parameter; any other model is the plain
module of the file, given them by `load_state_dict`.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bnnify.bnn.ensemble import Ensemble, StackedEnsemble
from bnnify.errors import InputError, UsageError
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.export_inputs import check_shapes
from bnnify.formats.model_files import LoadedModel, ModelFormat
from bnnify.formats.plain_model import independent
from bnnify.usecases import LOGGER_NAME
from bnnify.usecases.model_call import call_of
from bnnify.usecases.runner import (
    ModuleRunner,
    Runner,
    ScriptRunner,
    source_module,
)

__all__ = [
    "CHECK_EXAMPLES",
    "Draws",
    "OpenedModel",
    "cast_tensor",
    "check_tensors",
    "compare_outputs",
    "export_program",
    "open_for_export",
    "plain_state",
    "reference_outputs",
    "script_module",
    "stacked_program",
]

logger = logging.getLogger(LOGGER_NAME)

# The exported file is run on at most this many examples of the inputs and compared.
CHECK_EXAMPLES = 256


@dataclass(frozen=True)
class Draws:
    """Which weights: `count` frozen samples after `torch.manual_seed(seed)`, or the means."""

    mean: bool
    count: int = 1
    seed: int = 0


@dataclass
class OpenedModel:
    """A model file opened for export.

    Attributes:
        loaded: The file (its format, and its program for torch.export).
        runner: Runs it with the checkpoint's posterior: the source of every weight.
        plain: A module of the file, not reparametrized (None for TorchScript, whose
            weights the runner installs).
        deterministic: The checkpoint's kept tensors (buffers, excluded parameters).
    """

    loaded: LoadedModel
    runner: Runner
    plain: nn.Module | None
    deterministic: dict[str, Tensor]

    @torch.no_grad()
    def weights(self, draws: Draws) -> list[dict[str, Tensor]]:
        """The weight sets of `draws`, by parameter name (tied names share a tensor)."""
        bnn = self.runner.bnn
        if draws.mean:
            return [independent(bnn.sample_parameters(mean=True))]
        return _frozen(bnn, draws, lambda: independent(bnn.sample_parameters()))

    def order(self, names: Sequence[str]) -> list[str]:
        """`names` in the order of the model file, then the others."""
        known = [name for name in self.loaded.names() if name in names]
        return known + [name for name in names if name not in known]


def open_for_export(
    loaded: LoadedModel,
    checkpoint: Checkpoint,
    *,
    arch: str | None = None,
    arch_kwargs: str | Mapping[str, Any] | None = None,
) -> OpenedModel:
    """Opens `loaded` with `checkpoint`'s posterior, on the CPU (see `source_module`)."""
    module = source_module(loaded, checkpoint, arch=arch, arch_kwargs=arch_kwargs)
    deterministic = checkpoint.deterministic_state()
    call = call_of(loaded, module)
    if loaded.format is ModelFormat.TORCHSCRIPT:
        runner = ScriptRunner(module, checkpoint, "cpu", call)
        return OpenedModel(loaded, runner, None, deterministic)
    copied = _copy(module)
    if loaded.format is ModelFormat.EXPORT:
        # A deep copy of a torch.export module loses its forward pre-hooks.
        check_shapes(loaded.module, copied)
    runner = ModuleRunner(copied, checkpoint, "cpu", call)
    _eval(module)
    return OpenedModel(loaded, runner, module, deterministic)


def cast_tensor(runner: Runner, x: Tensor) -> Tensor:
    """`x` in the runner's dtype (as `Runner.cast_inputs`), still one tensor."""
    return runner.cast_inputs(x).sole("export checks")


@torch.no_grad()
def reference_outputs(runner: Runner, draws: Draws, x: Tensor) -> Tensor:
    """The runner's outputs on `x` with the weights of `draws`, stacked (K, batch, ...)."""
    x = cast_tensor(runner, x)
    if draws.mean:
        outputs = [runner.mean_forward(x)]
    else:
        outputs = _frozen(runner.bnn, draws, lambda: runner(x))
    for output in outputs:
        if not isinstance(output, Tensor):
            raise InputError(
                f"the model returns a {type(output).__name__}, not one tensor: bnnify exports "
                "and checks models with one tensor output",
                hint="Wrap the model so that forward returns a single tensor.",
            )
    return torch.stack(outputs)


def _frozen(bnn: Any, draws: Draws, compute: Callable[[], Any]) -> list[Any]:
    """`compute()` under each of `draws.count` frozen samples drawn from `draws.seed`."""
    results = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(draws.seed)
        for _ in range(draws.count):
            with bnn.frozen_sample():
                results.append(compute())
    return results


def plain_state(opened: OpenedModel, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model's state dict with `weights`: every tensor of the file, by its name."""
    tensors = {**weights, **opened.deterministic}
    return {name: tensors[name] for name in opened.order(list(tensors))}


def _plain_copy(opened: OpenedModel, weights: Mapping[str, Tensor]) -> nn.Module:
    assert opened.plain is not None
    module = _copy(opened.plain)
    module.load_state_dict({**weights, **opened.deterministic}, strict=True)
    return module


def _script_copy(opened: OpenedModel, weights: Mapping[str, Tensor]) -> Any:
    """The TorchScript model with `weights` installed, as a fresh copy."""
    runner = opened.runner
    assert isinstance(runner, ScriptRunner)
    runner.assign(tuple(weights[name] for name in runner.names))
    buffer = io.BytesIO()
    torch.jit.save(runner.script, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def script_module(
    opened: OpenedModel, weight_sets: list[dict[str, Tensor]], *, softmax: bool, noise: float
) -> Any:
    """A TorchScript module: the model with one weight set, or an `Ensemble` of them."""
    copies = _script_copy if opened.plain is None else _plain_copy
    members = [copies(opened, weights) for weights in weight_sets]
    if len(members) == 1 and opened.plain is None:
        return members[0]
    content: nn.Module = members[0] if len(members) == 1 else Ensemble(members, softmax, noise)
    try:
        return torch.jit.script(content)
    except Exception as error:  # TorchScript's compiler: any failure means "not scriptable"
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UsageError(
            f"TorchScript cannot compile this model ({type(error).__name__}: {first})",
            hint="Export it with --format export (torch.export, with --input), or as a state dict.",
        ) from None


def export_program(
    opened: OpenedModel, weights: dict[str, Tensor], x: Tensor | None
) -> tuple[AbstractContextManager[Any], bool | None]:
    """A torch.export program of the model with `weights`, and whether its batch is dynamic.

    The program comes in a context manager: save it inside. A torch.export file keeps
    its own graph, dynamic shapes included (None: as exported), and gets the tensors
    swapped in for the block (a deep copy of a program renames its graph's nodes); any
    other module is traced on `x`.
    """
    if opened.loaded.format is ModelFormat.EXPORT:
        return _Swap(opened.loaded.module, {**weights, **opened.deterministic}), None
    assert x is not None
    module = _plain_copy(opened, weights)
    last: Exception | None = None
    for dynamic in (True, False):
        try:
            program = torch.export.export(module, (x,), dynamic_shapes=_shapes(dynamic))
        except Exception as error:  # torch.export: any failure means "try the next way"
            last = error
            continue
        _warn_if_fixed(dynamic, x)
        return nullcontext(program), dynamic
    raise _untraceable(last)


def stacked_program(
    opened: OpenedModel,
    weight_sets: list[dict[str, Tensor]],
    x: Tensor,
    *,
    softmax: bool,
    noise: float,
) -> tuple[Any, str, bool]:
    """A torch.export program of a `StackedEnsemble`: (program, batching, dynamic batch).

    Batched with `vmap` where the model allows it (a layer that fixes the batch size
    under vmap, such as BatchNorm, does not), else a loop over the weight sets; with a
    dynamic batch dimension where the model allows one, else the batch of `x`.
    """
    base = _plain_copy(opened, weight_sets[0])
    stacked = {name: torch.stack([w[name] for w in weight_sets]) for name in weight_sets[0]}
    last: Exception | None = None
    for dynamic in (True, False):
        for batched in (True, False):
            module = StackedEnsemble(base, stacked, batched=batched, softmax=softmax, noise=noise)
            try:
                program = torch.export.export(module, (x,), dynamic_shapes=_shapes(dynamic))
            except Exception as error:  # torch.export: any failure means "try the next way"
                last = error
                continue
            if not batched:
                logger.info("vmap cannot batch this model: the ensemble loops over its weights")
            _warn_if_fixed(dynamic, x)
            return program, "vmap" if batched else "loop", dynamic
    raise _untraceable(last)


def _warn_if_fixed(dynamic: bool, x: Tensor) -> None:
    if not dynamic:
        logger.warning(
            "torch.export could not keep the batch dimension dynamic: the program takes "
            "batches of exactly %d examples, as --input",
            x.shape[0],
        )


def _shapes(dynamic: bool) -> tuple:
    dim = torch.export.Dim.DYNAMIC if dynamic else torch.export.Dim.STATIC
    return ({0: dim},)


def _untraceable(error: Exception | None) -> UsageError:
    text = str(error).strip().splitlines()[0] if error is not None and str(error).strip() else ""
    return UsageError(
        f"torch.export cannot trace this model on the --input examples "
        f"({type(error).__name__}: {text})",
        hint="Check that --input holds examples the model takes, or export with "
        "--format torchscript or as a state dict.",
    )


class _Swap:
    """A program whose tensors are replaced while `with` lasts (then restored)."""

    def __init__(self, program: Any, tensors: Mapping[str, Tensor]):
        self.program = program
        self.tensors = tensors
        self._saved: list[tuple[dict, str, Any]] = []

    def __enter__(self) -> Any:
        for table in (self.program.state_dict, self.program.constants):
            for name, old in list(table.items()):
                if name in self.tensors:
                    self._saved.append((table, name, old))
                    new = self.tensors[name].to(old.dtype)
                    table[name] = nn.Parameter(new, False) if isinstance(old, nn.Parameter) else new
        return self.program

    def __exit__(self, *exc_info: object) -> None:
        for table, name, old in reversed(self._saved):
            table[name] = old
        self._saved.clear()


def _copy(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        # torch 2.13 copying a torch.export module warns about its own pytree internals.
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(module)


def _eval(module: nn.Module) -> None:
    try:
        module.eval()
    except NotImplementedError:  # torch.export modules are fixed in their exported mode
        module.training = False


def check_tensors(found: Any, expected: Mapping[str, Tensor]) -> dict[str, Any]:
    """The state dict read back holds exactly the tensors written."""
    assert isinstance(found, dict) and set(found) == set(expected), "state dict keys differ"
    for name, tensor in expected.items():
        if not torch.equal(found[name], tensor.cpu()):
            raise InputError(f"the exported tensor {name!r} did not read back as written")
    return {"kind": "tensors", "examples": None, "max_abs_diff": 0.0, "tolerance": 0.0}


@torch.no_grad()
def compare_outputs(module: Any, x: Tensor, expected: Tensor | tuple) -> dict[str, Any]:
    """Runs the file read back on `x`: it must give bnnify's predictions, to a tolerance."""
    found = module(x)
    pairs = (
        list(zip(found, expected, strict=True))
        if isinstance(expected, tuple)
        else [(found, expected)]
    )
    worst, tolerance = 0.0, 0.0
    for got, want in pairs:
        want = want.double()
        scale = float(want.abs().max()) if want.numel() else 0.0
        # Float32 kernels (vmap's batched matmul, TorchScript's fusions) differ in the last
        # bits; a wrong weight differs by its posterior spread, orders of magnitude more.
        tol = (1e-4 if got.dtype in (torch.float32, torch.float64) else 1e-2) * (1.0 + scale)
        diff = float((got.double() - want).abs().max()) if want.numel() else 0.0
        if not math.isfinite(diff) or diff > tol:
            raise InputError(
                f"the exported model does not reproduce bnnify's predictions on the --input "
                f"examples (largest difference {diff:.3g}, tolerance {tol:.3g})",
                hint="Nothing was written. Report it, with the model, if the model runs "
                "the same inputs deterministically.",
            )
        worst, tolerance = max(worst, diff), max(tolerance, tol)
    return {
        "kind": "outputs",
        "examples": int(x.shape[0]),
        "max_abs_diff": worst,
        "tolerance": tolerance,
    }
