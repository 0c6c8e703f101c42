"""Runs a model file with the weights of a variational checkpoint (for fit and predict).

An `nn.Module` (an export program's module, an `arch` module, a trusted pickle) is
reparametrized in place by `BayesianModule`. A TorchScript module cannot be: each
pass assigns freshly sampled weights to it as new leaf parameters, and a custom
autograd function carries the gradient of the loss with respect to those weights
back to `mu` and `rho` (the chain rule of the reparameterization trick).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bnnify.bnn import BayesianModule
from bnnify.errors import InputError, UsageError
from bnnify.formats.arch import build_arch, confirm_arch, load_strict
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.export_archive import unlift
from bnnify.formats.model_files import LoadedModel, ModelFormat
from bnnify.usecases.script_weights import ScriptWeights

__all__ = [
    "ModuleRunner",
    "Runner",
    "ScriptRunner",
    "check_input",
    "open_runner",
    "source_module",
]


class Runner(nn.Module):
    """A model file with Bayesian weights: `forward` draws one weight sample.

    Attributes:
        bnn: The `BayesianModule` holding the variational parameters (train these).
    """

    bnn: BayesianModule

    def cast_input(self, x: Tensor) -> Tensor:
        """`x` in the model's floating dtype: CSV and numpy data come as float64."""
        dtype = self.bnn.dtype
        if x.is_floating_point() and x.dtype != dtype:
            return x.to(dtype)
        return x

    def mean_forward(self, x: Tensor) -> Tensor:
        """The model with every weight at its posterior mean."""
        with self.bnn.mean_weights():
            return self(x)

    @torch.no_grad()
    def predict_samples(self, x: Tensor, num_samples: int) -> Tensor:
        """`num_samples` outputs for `x`, stacked on a new first dimension."""
        return torch.stack([self(x) for _ in range(num_samples)])

    @torch.no_grad()
    def predict_batches(
        self, x: Tensor, num_samples: int, batch_size: int, *, mean: bool = False
    ) -> Tensor:
        """`predict_samples` of `x` batch by batch, on the CPU (`mean`: one mean pass)."""
        parts = []
        for start in range(0, x.shape[0], batch_size):
            chunk = x[start : start + batch_size].to(self.bnn.device)
            if mean:
                parts.append(self.mean_forward(chunk).unsqueeze(0).cpu())
            else:
                parts.append(self.predict_samples(chunk, num_samples).cpu())
        return torch.cat(parts, 1)


class ModuleRunner(Runner):
    """An `nn.Module` reparametrized in place."""

    def __init__(self, module: nn.Module, checkpoint: Checkpoint, device: str):
        super().__init__()
        self.bnn = checkpoint.to_bayesian(module, device=device)
        _eval(self.bnn)

    def forward(self, x: Tensor) -> Tensor:
        return self.bnn(self.cast_input(x))

    @torch.no_grad()
    def predict_samples(self, x: Tensor, num_samples: int) -> Tensor:
        return self.bnn.predict_samples(self.cast_input(x), num_samples=num_samples)


class _ScriptCall(torch.autograd.Function):
    """Output of a TorchScript module whose parameters are given as inputs."""

    @staticmethod
    def forward(ctx: Any, runner: ScriptRunner, x: Tensor, *weights: Tensor) -> Tensor:
        leaves = runner.assign(weights)
        with torch.enable_grad():
            output = runner.script(x)
        ctx.leaves, ctx.output = leaves, output
        return output.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        grads = torch.autograd.grad(ctx.output, ctx.leaves, grad, allow_unused=True)
        ctx.leaves = ctx.output = None
        return (None, None, *grads)


class ScriptRunner(Runner):
    """A TorchScript module run with weights drawn from the checkpoint's posterior."""

    def __init__(self, script: torch.jit.ScriptModule, checkpoint: Checkpoint, device: str):
        super().__init__()
        self.bnn = checkpoint.to_bayesian(device=device)
        self.bnn.eval()
        self.names = self.bnn.reparametrized_names()
        # Found before the move to `device`, which may turn shared memory into copies.
        self._weights = ScriptWeights(script, self.names)
        self._reach_checked = False
        # Not a submodule: its parameters are replaced on every pass and must stay out
        # of parameters() (the optimizer and DDP see only the variational ones).
        object.__setattr__(self, "script", script.to(device).eval())
        self._load(checkpoint.deterministic_state(device))

    def _load(self, tensors: dict[str, Tensor]) -> None:
        """Copies the deterministic tensors (buffers, excluded parameters) into the script."""
        targets = {**dict(self.script.named_parameters()), **dict(self.script.named_buffers())}
        with torch.no_grad():
            for name, tensor in tensors.items():
                target = targets.get(name)
                if target is None:
                    raise InputError(f"the TorchScript model has no tensor {name!r}")
                target.copy_(tensor)

    def assign(self, weights: tuple[Tensor, ...]) -> list[nn.Parameter]:
        """Installs `weights` as new leaf parameters wherever the script reads them."""
        return self._weights.install(weights)

    def forward(self, x: Tensor) -> Tensor:
        x = self.cast_input(x)
        values = self.bnn.sample_parameters()
        weights = [values[name] for name in self.names]
        if not self._reach_checked:
            # Once, on two examples: bounded by the cost of one small training step.
            self._weights.check_reach(lambda: self.script(x[:2].clone()), weights)
            self._reach_checked = True
        if not torch.is_grad_enabled() or not any(w.requires_grad for w in weights):
            self.assign(tuple(weights))
            return self.script(x)
        return _ScriptCall.apply(self, x, *weights)


@torch.no_grad()
def check_input(runner: Runner, x: Tensor) -> Tensor:
    """Runs the mean model on two examples; a failure becomes an `InputError`."""
    sample = runner.cast_input(x[:2].to(runner.bnn.device))
    try:
        return runner.mean_forward(sample)
    except Exception as error:  # the model's own code: any failure means bad input
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"the model cannot run on inputs of shape {tuple(x.shape[1:])} per example, "
            f"dtype {str(sample.dtype).removeprefix('torch.')} ({type(error).__name__}: {first})",
            hint="Check the data against the model's input. A torch.export program only "
            "takes the shapes it was exported for: export with a dynamic batch dimension.",
        ) from None


def _eval(module: nn.Module) -> None:
    """Evaluation mode: normalization statistics stay those of the trained model."""
    try:
        module.eval()
    except NotImplementedError:
        # torch.export modules are fixed in the mode they were exported in.
        module.training = False


def _check_source(loaded: LoadedModel, checkpoint: Checkpoint) -> None:
    recorded = checkpoint.source.get("sha256")
    if not isinstance(recorded, str) or not recorded:
        raise InputError(
            f"{checkpoint.path} records no SHA-256 of the model it was converted from",
            hint="Convert the model again with `bnnify convert`.",
        )
    if recorded != loaded.sha256:
        raise InputError(
            f"{loaded.path} does not match the checkpoint: it was converted from "
            f"{checkpoint.source.get('name')!r} (sha256 {recorded[:12]}...), this file has "
            f"sha256 {loaded.sha256[:12]}...",
            hint="Pass the same model file that `bnnify convert` read.",
        )


def open_runner(
    model: LoadedModel,
    checkpoint: Checkpoint,
    *,
    device: str = "cpu",
    arch: str | None = None,
    arch_kwargs: str | Mapping[str, Any] | None = None,
) -> Runner:
    """A runner for `model` with the posterior of `checkpoint`.

    Args:
        model: The model file the checkpoint was converted from.
        checkpoint: The variational checkpoint.
        device: Where to run.
        arch: For a state dict, the architecture recorded in the checkpoint, repeated
            by the caller: building it imports and runs that code, and a checkpoint is
            data that must not decide on its own what code runs.
        arch_kwargs: Its recorded keyword arguments, repeated likewise (a JSON object
            or a mapping); see `confirm_arch`.

    Raises:
        InputError: If the model file is not the one the checkpoint came from.
        UsageError: If the model has no architecture (a plain state dict converted
            without `arch`).
        UnsafeInputError: If the checkpoint names an architecture and `arch` and
            `arch_kwargs` do not confirm it.
    """
    module = source_module(model, checkpoint, arch=arch, arch_kwargs=arch_kwargs)
    if model.format is ModelFormat.TORCHSCRIPT:
        return ScriptRunner(module, checkpoint, device)
    return ModuleRunner(module, checkpoint, device)


# ------------------------------------------------ the model file's own module


def source_module(
    model: LoadedModel,
    checkpoint: Checkpoint,
    *,
    arch: str | None = None,
    arch_kwargs: str | Mapping[str, Any] | None = None,
) -> nn.Module:
    """The plain module a runner for `model` wraps: what `open_runner` reparametrizes.

    The TorchScript module as loaded, the module of an export program, a copy of a
    pickled or in-memory module (the caller's stays as it was), or the confirmed
    architecture with the state dict loaded. Arguments and errors: see `open_runner`.
    """
    _check_source(model, checkpoint)
    if model.format is ModelFormat.TORCHSCRIPT:
        return model.module
    if model.format is ModelFormat.EXPORT:
        return unlift(model.module, model.path)
    if model.format in (ModelFormat.PICKLED_MODULE, ModelFormat.MODULE):
        return copy.deepcopy(model.module)
    recorded = checkpoint.spec.arch
    if recorded is None:
        raise UsageError(
            f"{model.path.name} is a {model.format.value} without an architecture, so it "
            "cannot be run",
            hint="Convert it with `arch:` in the spec, or save the model as TorchScript or "
            "torch.export.",
        )
    kwargs = checkpoint.spec.arch_kwargs
    confirm_arch(recorded, kwargs, arch, arch_kwargs, where=str(checkpoint.path))
    module = build_arch(recorded, kwargs)
    load_strict(module, {n: model.tensor(n) for n in model.names()}, recorded)
    return module
