"""`BayesianModule`: turns any `nn.Module` into a Bayes-by-Backprop network, in place."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Normal

from bnnify.bnn.collect import Entry, collect_parameters, linear_pairs, select
from bnnify.bnn.divergence import Divergence, check_reduction, check_samples
from bnnify.bnn.fused import FusedSampler
from bnnify.bnn.noise import check_noise
from bnnify.bnn.posteriors import PosteriorFactory, get_posterior, initialize_into, is_flat
from bnnify.bnn.priors import get_prior
from bnnify.bnn.registry import Spec, parse_spec
from bnnify.bnn.reparametrize import Sampler, Slot, install_
from bnnify.bnn.rowwise import Estimator, EstimatorChoice, choose_estimator
from bnnify.bnn.store import GaussianStore
from bnnify.errors import (
    ArgumentTypeError,
    BnnifyError,
    FormatError,
    InvalidArgumentError,
    UsageError,
)

__all__ = ["BayesianModule"]

logger = logging.getLogger("bnnify")


class BayesianModule(nn.Module):
    """Reparametrizes, in place, the parameters of `module` with variational posteriors.

    Afterwards the wrapped module's parameters are no longer `nn.Parameter`s: reading
    one returns a reparameterized sample, and the trainable parameters are the
    posteriors' variational parameters, so `optimizer(bnn.parameters())` trains the
    posterior (build the optimizer after the `BayesianModule`). Each forward pass
    draws one fresh sample of every weight; tied parameters stay tied. The training
    flag is the wrapped module's; `eval()` does not stop sampling (use
    `mean_weights()` for a deterministic pass).

    Gaussian posteriors (the built-in ones) are stored flat: all `mu` and all `rho`
    of one dtype and device in two tensors (`variational.<i>.mu`, `.rho`), so that
    sampling, the KL divergence and the optimizer run a few large kernels.

    Args:
        module: The module to convert, modified in place.
        variational_posterior: Posterior name or `(name, kwargs)`; default Gaussian.
        prior: Prior name or `(name, kwargs)`; default Gaussian N(0, 1).
        dtype: Dtype of the KL result (default: that of the first parameter).
        device: Device of the KL result (default: that of the first parameter).
        verbose: Log each parameter as it is reparametrized (logger "bnnify").
        include: Glob patterns over parameter names; only matches become Bayesian.
        exclude: Glob patterns over parameter names that stay deterministic.
        local_reparameterization: Sample the pre-activations of `nn.Linear` layers
            given a 2-D input instead of their weights (Kingma et al., 2015), in
            every forward pass and in `predict_samples`. Your assertion that each row
            of each such input is one independent example: a model that reshapes
            `(B, T*d)` to `(B*T, d)` would get a spread too small. Without it,
            `predict_samples` uses the trick only where it is proven (see
            `predictive_estimator`).
        debug: Alias of `verbose` (the name used by torchbayesian 0.2.1).
        compile_kernels: How training samples flat Gaussian stores. None (default):
            by kernels compiled with `torch.compile` for stores of at least
            `bnnify.bnn.fused.MIN_COMPILE_NUMEL` elements where compiling is possible
            (a C++ compiler, float32 or float64 on the CPU), else eagerly; True:
            compiled whatever the size; False: always eager. The environment
            variable `BNNIFY_COMPILE=0` forces eager everywhere, `=1` compiles
            whatever the size. The choice is logged once at debug level.
        noise: "fresh" (default): new normal noise for every weight at every
            training step. "shifted": one buffer of normals reused at every step
            under a fresh random cyclic shift and random signs, cheaper (each
            step's estimate is unbiased, but the steps share the noise magnitudes;
            see README). Gradient steps of compiled stores only; the others draw
            fresh noise. Settable later as `model.noise`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> bnn = BayesianModule(net, prior=("gaussian", {"sigma": 0.5}))
        >>> bnn(torch.randn(4, 3)).shape
        torch.Size([4, 1])
        >>> bool(bnn.kl_divergence() > 0)
        True
    """

    def __init__(
        self,
        module: nn.Module,
        variational_posterior: Spec | None = None,
        prior: Spec | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | int | None = None,
        verbose: bool = False,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        local_reparameterization: bool = False,
        debug: bool | None = None,
        compile_kernels: bool | None = None,
        noise: str = "fresh",
    ):
        super().__init__()
        _check_module(module)
        self.posterior_spec = parse_spec(variational_posterior, "gaussian", "posterior")
        self.prior_spec = parse_spec(prior, "gaussian", "prior")
        packed = is_flat(PosteriorFactory[self.posterior_spec[0]])
        entries = select(collect_parameters(module), include, exclude)
        first = entries[0].param
        lrt = linear_pairs(module, entries) if packed else {}
        self.module = module
        self.variational = nn.ModuleList()
        self.posteriors = nn.ModuleDict()
        self.priors = nn.ModuleList()
        self._slots: list[Slot] = []
        lrt_ends = self._allocate(entries, lrt) if packed else []
        self._sampler = Sampler(self.variational, self.posteriors, lrt_ends)
        self._sampler.local = bool(local_reparameterization)
        self.register_buffer(
            "_kl_meta",
            torch.empty(0, dtype=dtype or first.dtype, device=device or first.device),
            persistent=False,
        )
        del first
        with _verbose_logging(verbose or bool(debug)):
            self._build(entries)
        for layer, (weight, bias) in lrt.items():
            layer.__dict__["_bnnify_lrt"] = (weight.slot, None if bias is None else bias.slot)
        self._divergence = Divergence(self.variational, self._slots, self.priors, self.posteriors)
        fused = [FusedSampler(store, compile=compile_kernels) for store in self.variational]
        self._sampler.fused = self._divergence.fused = fused
        self._divergence.refresh()
        self.noise = noise
        # Loading a state_dict changes the priors' values, which the segments read.
        self.register_load_state_dict_post_hook(_refresh_segments)
        self.training = module.training

    def _allocate(self, entries: list[Entry], lrt: dict) -> list[int]:
        """Creates the flat stores and orders their slots, local-trick Linears first."""
        eligible = {id(e) for pair in lrt.values() for e in pair if e is not None}
        groups: dict[tuple, list[Entry]] = {}
        for entry in entries:
            groups.setdefault((entry.param.dtype, entry.param.device), []).append(entry)
        lrt_ends = []
        for (dtype, device), group in groups.items():
            group.sort(key=lambda e: id(e) not in eligible)
            shapes = [e.param.shape for e in group]
            store = GaussianStore([e.name for e in group], shapes, dtype, device)
            for index, entry in enumerate(group):
                entry.store, entry.index = len(self.variational), index
            self.variational.append(store)
            lrt_ends.append(sum(id(e) in eligible for e in group))
        entries.sort(key=lambda e: (e.store, e.index))
        return lrt_ends

    def _build(self, entries: list[Entry]) -> None:
        for entry in entries:
            param, entry.param = entry.param.detach(), None
            slot = Slot(entry.name, entry.aliases, param.shape, self._sampler)
            try:
                if entry.store is not None:
                    # Written straight into the flat storage: no parameter-sized copies.
                    store = self.variational[entry.store]
                    with torch.no_grad():
                        mu, rho = (store.view(t, entry.index) for t in (store.mu, store.rho))
                        initialize_into(self.posterior_spec, mu, rho, param)
                    slot.store, slot.index = entry.store, entry.index
                else:
                    slot.index = entry.name.replace(".", ":")
                    self.posteriors[slot.index] = get_posterior(self.posterior_spec, param)
                prior = get_prior(self.prior_spec, param)
            except BnnifyError as error:
                message = f"parameter {entry.name!r}: {error.message}"
                raise type(error)(message, hint=error.hint) from None
            self.priors.append(prior)
            entry.slot = slot
            self._slots.append(slot)
            logger.info(
                "reparametrized %s shape=%s elements=%d dtype=%s posterior=%s prior=%s",
                entry.name,
                tuple(param.shape),
                param.numel(),
                str(param.dtype).removeprefix("torch."),
                self.posterior_spec[0],
                self.prior_spec[0],
            )
            del param
        # Only once every posterior and prior is built: a bad spec leaves the module untouched.
        for entry in entries:
            for owner, attr in entry.owners:
                install_(owner, attr, entry.slot)

    # ------------------------------------------------------------------ forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the wrapped module with one fresh sample of every reparametrized weight."""
        draw = self._sampler.begin()
        try:
            return self.module(*args, **kwargs)
        finally:
            self._sampler.end(draw)

    @contextmanager
    def mean_weights(self) -> Iterator[None]:
        """Context in which forward passes use the posterior means (deterministic)."""
        previous, self._sampler.mode = self._sampler.mode, "mean"
        try:
            yield
        finally:
            self._sampler.mode = previous

    @contextmanager
    def frozen_sample(self) -> Iterator[None]:
        """Context in which every forward pass reuses one weight sample.

        The noise is drawn once on entry; each pass recomputes the weights from it,
        so gradients reach the current `mu` and `rho` and several backward passes work.
        """
        previous, self._sampler.frozen = self._sampler.frozen, self._sampler.freeze()
        try:
            yield
        finally:
            self._sampler.frozen = previous

    @contextmanager
    def local_reparameterization(self, enabled: bool = True) -> Iterator[None]:
        """Context switching the local reparameterization trick on (or off)."""
        previous, self._sampler.local = self._sampler.local, bool(enabled)
        try:
            yield
        finally:
            self._sampler.local = previous

    def sample_parameters(self, *, mean: bool = False) -> dict[str, Tensor]:
        """One draw of every reparametrized parameter, by name (tied aliases included)."""
        context = self.mean_weights() if mean else nullcontext()
        with context:
            draw = self._sampler.begin()
            try:
                return {alias: slot.value() for slot in self._slots for alias in slot.aliases}
            finally:
                self._sampler.end(draw)

    @torch.no_grad()
    def predict_samples(self, *inputs: Tensor, num_samples: int) -> Tensor:
        """`num_samples` outputs for the same inputs, stacked on a new first dimension.

        By default one forward pass per sample, every weight drawn from its posterior.
        The local reparameterization trick (one pass over the inputs repeated
        `num_samples` times, each `nn.Linear` pre-activation drawn per row) is used
        only where it gives each example exactly that predictive distribution: every
        reparametrized parameter belongs to an `nn.Linear` and the model is proven to
        act row by row on a 2-D input (see `bnnify.bnn.rowwise`), or the module was
        built with `local_reparameterization=True`, the user's assertion that rows
        are independent examples. Either way samples of different examples are then
        independent, not drawn from shared weights. `predictive_estimator(*inputs)`
        says which estimator is used, and why.
        """
        if num_samples < 1:
            raise InvalidArgumentError(f"num_samples must be >= 1, got {num_samples!r}")
        choice = self.predictive_estimator(*inputs)
        if choice.estimator is Estimator.LOCAL_REPARAMETERIZATION and not self._batch_refusal():
            output = self._sampler.repeated_pass(self.module, inputs, num_samples)
            if output is not None:
                return output
        return torch.stack([self(*inputs) for _ in range(num_samples)])

    @property
    def noise(self) -> str:
        """How training steps draw the weight noise: "fresh" or "shifted" (settable).

        Only compiled stores use shifted noise, and only for gradient steps:
        predictions and passes without gradients always draw fresh noise.
        """
        return self._noise.value

    @noise.setter
    def noise(self, value: str) -> None:
        self._noise = check_noise(value)
        for fused in self._sampler.fused:
            fused.noise = self._noise

    def training_kernels(self) -> list[str]:
        """How a training pass samples each flat store now: "compiled" or "eager (why)".

        Example:
            >>> BayesianModule(nn.Linear(3, 2)).training_kernels()
            ['eager (8 elements, fewer than the 1048576 worth compiling)']
        """
        choices = []
        for fused in self._sampler.fused:
            reason = fused.refusal()
            choices.append("compiled" if reason is None else f"eager ({reason})")
        return choices

    def predictive_estimator(self, *inputs: Tensor) -> EstimatorChoice:
        """The estimator `predict_samples(*inputs, ...)` uses, with the reason.

        Example:
            >>> mlp = BayesianModule(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)))
            >>> mlp.predictive_estimator(torch.zeros(5, 3)).estimator.value
            'local_reparameterization'
            >>> mlp.predictive_estimator(torch.zeros(5, 2, 3)).reason
            'the input has shape (5, 2, 3), not (batch, features)'
        """
        sampler = self._sampler
        modes = (sampler.mode, sampler.frozen is not None, sampler.local)
        return choose_estimator(modes, self._batch_refusal, self.module, inputs)

    def _batch_refusal(self) -> str | None:
        """Why one batched local-trick pass cannot serve all samples, or None."""
        sampler = self._sampler
        for k, slots in enumerate(self._divergence.store_slots):
            if len(slots) != sampler.lrt_ends[k]:
                name = slots[sampler.lrt_ends[k]][1].name
                return f"{name!r} is not the weight or bias of a plain nn.Linear used once"
        for slot in self._slots:
            if slot.store is None:
                return f"{slot.name!r} has a posterior that is not stored flat"
        return None

    # ---------------------------------------------------------------------- KL

    def kl_divergence(
        self, *, reduction: str = "sum", approx_num_samples: int | None = None
    ) -> Tensor:
        """KL(posterior || prior) over every element of every reparametrized parameter.

        Closed form where one is known for the (posterior, prior) pair, otherwise a
        Monte Carlo estimate with `approx_num_samples` samples. Scalar prior
        parameters are broadcast: no prior tensor of the model's size is built.

        Args:
            reduction: "sum" (the ELBO's term) or "mean" (sum / number of elements).
            approx_num_samples: Samples per element for a Monte Carlo estimate.

        Returns:
            A 0-dim tensor with the dtype and device of the `_kl_meta` buffer.

        Raises:
            ValueError: For an unknown reduction, an invalid sample count, or a pair
                with no closed form when `approx_num_samples` is None.
        """
        reduction = check_reduction(reduction)
        samples = check_samples(approx_num_samples)
        device = self._kl_meta.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        for value in self._divergence.terms(samples, device).values():
            total = total + value
        if reduction == "mean":
            total = total / max(self.num_variational_elements, 1)
        return total.to(self._kl_meta.dtype)

    def kl_by_parameter(self, *, approx_num_samples: int | None = None) -> dict[str, Tensor]:
        """Summed KL of each reparametrized parameter, as reports give it.

        Computed by `bnnify.bnn.kl_report.parameter_kl`, the function behind the KL of
        `bnnify convert` and `bnnify kl`: in float64, added in a fixed order, so the
        values do not depend on the thread count or on memory layout (only on the
        torch build and the CPU's instruction set). `kl_divergence()` uses faster
        kernels; the two agree to about 1e-6 relative in float32.

        Returns:
            0-dim float64 tensors on the CPU (no gradient), by parameter name.
        """
        samples = check_samples(approx_num_samples)
        return self._divergence.report(samples)

    # ------------------------------------------------------------ introspection

    @property
    def num_variational_elements(self) -> int:
        """Number of reparametrized weight elements (the denominator of "mean")."""
        return sum(slot.shape.numel() for slot in self._slots)

    def reparametrized_names(self) -> list[str]:
        """Names of the reparametrized parameters, in storage order."""
        return [slot.name for slot in self._slots]

    def variational_state(self) -> dict[str, Tensor]:
        """Per-parameter tensors of posteriors and priors (views, no copies).

        Keys are `"<name>.mu"`, `"<name>.rho"` for Gaussian posteriors (the names of
        the posterior's own state otherwise) and `"<name>.prior.<buffer>"` for prior
        tensors that are not scalars (such as the mean of an empirical prior).
        """
        state: dict[str, Tensor] = {}
        for i, slot in enumerate(self._slots):
            if slot.store is None:
                for key, tensor in self.posteriors[slot.index].state_dict().items():
                    state[f"{slot.name}.{key}"] = tensor
            else:
                store = self.variational[slot.store]
                state[f"{slot.name}.mu"] = store.view(store.mu.detach(), slot.index)
                state[f"{slot.name}.rho"] = store.view(store.rho.detach(), slot.index)
            for key, tensor in self.priors[i].named_buffers():
                if tensor.dim() > 0:
                    state[f"{slot.name}.prior.{key}"] = tensor
        return state

    @torch.no_grad()
    def load_variational_state(
        self, state: Mapping[str, Tensor], *, strict: bool = True
    ) -> tuple[list[str], list[str]]:
        """Copies per-parameter variational tensors in place (see `variational_state`).

        Returns:
            The `(missing, unexpected)` keys.

        Raises:
            FormatError: On a shape mismatch, or with `strict` on missing or
                unexpected keys.
        """
        own = self.variational_state()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise FormatError(
                f"variational state does not match: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}",
                hint="Load a checkpoint made from the same model and spec.",
            )
        for key, target in own.items():
            if key in state:
                if tuple(state[key].shape) != tuple(target.shape):
                    raise FormatError(
                        f"{key!r} has shape {tuple(state[key].shape)}, "
                        f"expected {tuple(target.shape)}"
                    )
                target.copy_(state[key])
        return missing, unexpected

    def posterior_distribution(self, name: str) -> Distribution:
        """The posterior of parameter `name` as a distribution (views of the storage)."""
        for slot in self._slots:
            if name in slot.aliases:
                if slot.store is None:
                    return self.posteriors[slot.index].distribution
                store = self.variational[slot.store]
                start, end = store.span(slot.index)
                sigma = store.sigma(start, end).view(slot.shape)
                return Normal(store.view(store.mu, slot.index), sigma)
        raise InvalidArgumentError(
            f"{name!r} is not a reparametrized parameter",
            hint=f"Reparametrized: {', '.join(self.reparametrized_names()[:10])}.",
        )

    def extra_repr(self) -> str:
        return (
            f"posterior={self.posterior_spec[0]!r}, prior={self.prior_spec[0]!r}, "
            f"parameters={len(self._slots)}, elements={self.num_variational_elements}"
        )


def _refresh_segments(module: BayesianModule, incompatible_keys: Any) -> None:
    module._divergence.refresh()


def _check_module(module: Any) -> None:
    if not isinstance(module, nn.Module):
        raise ArgumentTypeError(
            f"BayesianModule needs an nn.Module, got {type(module).__name__}",
            hint="Pass the model itself, e.g. BayesianModule(net).",
        )
    if isinstance(module, BayesianModule):
        raise UsageError("the module is already a BayesianModule", hint="Wrap a module once.")
    if isinstance(module, torch.jit.ScriptModule):
        raise UsageError(
            "a TorchScript module cannot be reparametrized in place",
            hint="Convert TorchScript files with `bnnify convert` or `bnnify.convert()`.",
        )


@contextmanager
def _verbose_logging(enabled: bool) -> Iterator[None]:
    """Shows INFO records of the "bnnify" logger on stderr when nothing else would."""
    if not enabled:
        yield
        return
    previous = logger.level
    logger.setLevel(logging.INFO)
    handler = None
    if not logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("bnnify: %(message)s"))
        logger.addHandler(handler)
    try:
        yield
    finally:
        logger.setLevel(previous)
        if handler is not None:
            logger.removeHandler(handler)
