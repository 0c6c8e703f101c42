"""Runs a model file with the weights of a variational checkpoint (for fit and predict).

An `nn.Module` (an export program's module, an `arch` module, a trusted pickle) is
reparametrized in place by `BayesianModule`. A TorchScript module cannot be: each
pass assigns freshly sampled weights to it as new leaf parameters, and a custom
autograd function carries the gradient of the loss with respect to those weights
back to `mu` and `rho` (the chain rule of the reparameterization trick).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bnnify.bnn import BayesianModule, Estimator, EstimatorChoice
from bnnify.bnn.reach import refuse_not_one_tensor, refuse_stateful, refuse_unreached
from bnnify.errors import BnnifyError, InputError, UsageError
from bnnify.formats.arch import build_arch, confirm_arch, load_strict
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.export_archive import unlift
from bnnify.formats.model_files import LoadedModel, ModelFormat
from bnnify.formats.model_inputs import Inputs, as_inputs
from bnnify.usecases.model_call import ModelCall, call_of, forward_signature
from bnnify.usecases.script_weights import ScriptWeights
from bnnify.usecases.sources import InputsLike

__all__ = [
    "ModuleRunner",
    "Runner",
    "ScriptRunner",
    "check_input",
    "open_runner",
    "source_module",
]

_MODULE_FIX = "Read the parameter in forward (not a copy or a tensor computed from it in __init__)."


class Runner(nn.Module):
    """A model file with Bayesian weights: `forward` draws one weight sample.

    Every method takes the model's per-example inputs as `Inputs` (or one tensor, or
    tensors by name) and binds them and the constant arguments to the model's
    `forward` (`call`). Before the first pass it checks, on two examples, that every
    Bayesian weight reaches the output and that the model keeps no state between
    calls (`bnnify.bnn.reach`).

    Attributes:
        bnn: The `BayesianModule` holding the variational parameters (train these).
        call: How inputs and constant arguments are passed to the model's `forward`.
    """

    bnn: BayesianModule
    call: ModelCall
    _checked = False
    _model = "the model"  # in messages

    def cast_inputs(self, inputs: InputsLike) -> Inputs:
        """Floating inputs in the model's dtype (CSV and numpy data come as float64)."""
        dtype = self.bnn.dtype
        return as_inputs(inputs).map(
            lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
        )

    def arguments(self, inputs: InputsLike) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments of the model's `forward` for these inputs (cast, not moved)."""
        inputs = self.cast_inputs(inputs)
        if not self._checked:
            # Once, on two examples: bounded by the cost of one small training step.
            args, kwargs = self.call.bind(inputs[:2].map(torch.clone))
            self._check_reach(args, kwargs)
            with torch.no_grad():
                first = self._mean_call(args, kwargs)
                refuse_not_one_tensor(first, model=self._model)
                refuse_stateful(first, self._mean_call(args, kwargs), model=self._model)
            self._checked = True
        return self.call.bind(inputs)

    def _check_reach(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise NotImplementedError

    def _mean_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The model's output with the posterior means, without the checks."""
        raise NotImplementedError

    def mean_forward(self, inputs: InputsLike) -> Tensor:
        """The model with every weight at its posterior mean."""
        with self.bnn.mean_weights():
            return self(inputs)

    @torch.no_grad()
    def predict_samples(self, inputs: InputsLike, num_samples: int) -> Tensor:
        """`num_samples` outputs for `inputs`, stacked on a new first dimension."""
        return torch.stack([self(inputs) for _ in range(num_samples)])

    def estimator(self, inputs: InputsLike, *, mean: bool = False) -> EstimatorChoice:
        """The estimator `predict_samples` (or, with `mean`, `mean_forward`) uses, and why."""
        if mean:
            return EstimatorChoice(
                Estimator.POSTERIOR_MEAN, "mean weights: one pass with the posterior means"
            )
        return self._sampling_estimator(inputs)

    def _sampling_estimator(self, inputs: InputsLike) -> EstimatorChoice:
        raise NotImplementedError

    @torch.no_grad()
    def predict_batches(
        self, inputs: InputsLike, num_samples: int, batch_size: int, *, mean: bool = False
    ) -> Tensor:
        """`predict_samples` of `inputs` batch by batch, on the CPU (`mean`: one mean pass).

        Every per-example input is sliced along dim 0; constant arguments are passed
        unchanged with every batch.
        """
        inputs = as_inputs(inputs)
        parts = []
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size].to(self.bnn.device)
            if mean:
                parts.append(self.mean_forward(chunk).unsqueeze(0).cpu())
            else:
                parts.append(self.predict_samples(chunk, num_samples).cpu())
        return torch.cat(parts, 1)


class ModuleRunner(Runner):
    """An `nn.Module` reparametrized in place.

    Args:
        module: The module (reparametrized in place).
        checkpoint: The variational checkpoint.
        device: Where to run.
        call: How to call its `forward` (default: the signature of `module.forward`,
            no constant arguments).
    """

    def __init__(
        self,
        module: nn.Module,
        checkpoint: Checkpoint,
        device: str,
        call: ModelCall | None = None,
        prior: tuple[str, dict] | None = None,
    ):
        super().__init__()
        self.call = call or ModelCall(forward_signature(module))
        self.bnn = checkpoint.to_bayesian(module, prior=prior, device=device)
        _eval(self.bnn)

    def forward(self, inputs: InputsLike) -> Tensor:
        args, kwargs = self.arguments(inputs)
        return self.bnn(*args, **kwargs)

    @torch.no_grad()
    def predict_samples(self, inputs: InputsLike, num_samples: int) -> Tensor:
        args, kwargs = self.arguments(inputs)
        return self.bnn.predict_samples(*args, num_samples=num_samples, **kwargs)

    def _sampling_estimator(self, inputs: InputsLike) -> EstimatorChoice:
        args, kwargs = self.call.bind(self.cast_inputs(inputs))
        return self.bnn.predictive_estimator(*args, **kwargs)

    def _mean_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self.bnn.mean_weights():
            return self.bnn(*args, **kwargs)

    def _check_reach(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        names = self.bnn.reparametrized_names()
        means = self.bnn.sample_parameters(mean=True)
        with torch.inference_mode(False), torch.enable_grad():
            # Views of the means as leaves: no copy of the weights.
            leaves = {name: means[name].detach().requires_grad_() for name in names}
            with self.bnn.given_weights(leaves):
                output = self.bnn(*args, **kwargs)
        refuse_unreached(output, list(leaves.values()), names, fix=_MODULE_FIX)


class _ScriptCall(torch.autograd.Function):
    """Output of a TorchScript module whose parameters are given as inputs."""

    @staticmethod
    def forward(ctx: Any, runner: ScriptRunner, run: Callable[[], Tensor], *weights: Tensor):
        leaves = runner.assign(weights)
        with torch.enable_grad():
            output = run()
        ctx.leaves, ctx.output = leaves, output
        return output.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        grads = torch.autograd.grad(ctx.output, ctx.leaves, grad, allow_unused=True)
        ctx.leaves = ctx.output = None
        return (None, None, *grads)


class ScriptRunner(Runner):
    """A TorchScript module run with weights drawn from the checkpoint's posterior."""

    _model = "the TorchScript model"

    def __init__(
        self,
        script: torch.jit.ScriptModule,
        checkpoint: Checkpoint,
        device: str,
        call: ModelCall | None = None,
        prior: tuple[str, dict] | None = None,
    ):
        super().__init__()
        self.call = call or ModelCall(forward_signature(script))
        self.bnn = checkpoint.to_bayesian(prior=prior, device=device)
        self.bnn.eval()
        self.names = self.bnn.reparametrized_names()
        # Found before the move to `device`, which may turn shared memory into copies.
        self._weights = ScriptWeights(script, self.names)
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

    def _sampling_estimator(self, inputs: InputsLike) -> EstimatorChoice:
        return EstimatorChoice(
            Estimator.WEIGHT_SAMPLING,
            "a TorchScript model runs once per sample, every weight drawn from its posterior",
        )

    def _sampled(self, *, mean: bool = False) -> list[Tensor]:
        values = self.bnn.sample_parameters(mean=mean)
        return [values[name] for name in self.names]

    def _mean_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.assign(tuple(self._sampled(mean=True)))
        return self.script(*args, **kwargs)

    def _check_reach(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # The means: the check draws no random numbers, so seeded runs stay as they were.
        weights = self._sampled(mean=True)
        self._weights.check_reach(lambda: self.script(*args, **kwargs), weights)

    def forward(self, inputs: InputsLike) -> Tensor:
        args, kwargs = self.arguments(inputs)
        weights = self._sampled()
        if not torch.is_grad_enabled() or not any(w.requires_grad for w in weights):
            self.assign(tuple(weights))
            return self.script(*args, **kwargs)
        return _ScriptCall.apply(self, lambda: self.script(*args, **kwargs), *weights)


@torch.no_grad()
def check_input(runner: Runner, inputs: InputsLike) -> Tensor:
    """Runs the mean model on two examples; a failure becomes an `InputError`.

    Also checks, once, that every Bayesian weight reaches the output.
    """
    inputs = as_inputs(inputs)
    sample = runner.cast_inputs(inputs[:2].to(runner.bnn.device))
    try:
        return runner.mean_forward(sample)
    except BnnifyError:
        raise
    except Exception as error:  # the model's own code: any failure means bad input
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for _, t in sample}))
        tensors = list(sample.tensors.values())
        one = f"of shape {tuple(tensors[0].shape[1:])}"
        shapes = one if len(tensors) == 1 else sample.shapes(per_example=True)
        raise InputError(
            f"the model cannot run on inputs {shapes} per example, dtype {dtypes} "
            f"({type(error).__name__}: {first})",
            hint="Check the data against the model's input (and --model-arg). A "
            "torch.export program only takes the shapes it was exported for: export "
            "with a dynamic batch dimension.",
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
    model_args: Mapping[str, Any] | None = None,
    prior: tuple[str, dict] | None = None,
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
        model_args: Constant arguments of the model's `forward`, by name (passed
            unchanged with every batch; see `ModelCall`).
        prior: A prior spec `(name, kwargs)` replacing the checkpoint's (`fit --search`).

    Raises:
        InputError: If the model file is not the one the checkpoint came from.
        UsageError: If the model has no architecture (a plain state dict converted
            without `arch`).
        UnsafeInputError: If the checkpoint names an architecture and `arch` and
            `arch_kwargs` do not confirm it.
        InvalidArgumentError: If `forward` has no parameter for a model argument.
    """
    module = source_module(model, checkpoint, arch=arch, arch_kwargs=arch_kwargs)
    call = call_of(model, module, model_args)
    if model.format is ModelFormat.TORCHSCRIPT:
        return ScriptRunner(module, checkpoint, device, call, prior)
    return ModuleRunner(module, checkpoint, device, call, prior)


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
        # Reparametrized in place: the caller's module stays as it was.
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
