"""`BayesianModule`: turns any `nn.Module` into a Bayes-by-Backprop network, in place."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Normal

from bnnify.bnn.build import Reparametrized, allocate_stores, build_parameters, check_module
from bnnify.bnn.collect import collect_parameters, linear_pairs, select
from bnnify.bnn.divergence import Divergence, check_reduction, check_samples
from bnnify.bnn.fused import FusedSampler
from bnnify.bnn.posteriors import PosteriorFactory, is_flat
from bnnify.bnn.registry import Spec, parse_spec
from bnnify.bnn.reparametrize import Sampler, Slot
from bnnify.bnn.rowwise import Estimator, EstimatorChoice, batch_refusal, choose_estimator
from bnnify.bnn.state import copy_state_, gather_state
from bnnify.enums import NoiseMode
from bnnify.errors import InvalidArgumentError, UsageError

__all__ = ["BayesianModule", "Reparametrized"]


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
        compile_kernels: Training kernels of flat Gaussian stores compiled by torch.compile:
            True at any size, False never, None (default) from `fused.MIN_COMPILE_NUMEL`
            elements where possible; `BNNIFY_COMPILE=0` or `=1` forces either everywhere.
        noise: "fresh" (default) normals at every training step, or "shifted": one
            buffer of normals under a random cyclic shift and random signs per step,
            cheaper, unbiased per step, magnitudes shared between steps (README).
            Gradient steps of compiled stores only. Settable as `model.noise`.

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
        check_module(module)
        if isinstance(module, BayesianModule):
            raise UsageError("the module is already a BayesianModule", hint="Wrap a module once.")
        self.posterior_spec = parse_spec(variational_posterior, "gaussian", "posterior")
        self.prior_spec = parse_spec(prior, "gaussian", "prior")
        packed = is_flat(PosteriorFactory[self.posterior_spec[0]])
        entries = select(collect_parameters(module), include, exclude)
        first = entries[0].param
        lrt = linear_pairs(module, entries) if packed else {}
        self.module = module
        stores, lrt_ends = allocate_stores(entries, lrt) if packed else ([], [])
        self.variational = nn.ModuleList(stores)
        self.posteriors = nn.ModuleDict()
        self._sampler = Sampler(self.variational, self.posteriors, lrt_ends)
        self._sampler.local = bool(local_reparameterization)
        self.register_buffer(
            "_kl_meta",
            torch.empty(0, dtype=dtype or first.dtype, device=device or first.device),
            persistent=False,
        )
        del first
        specs = (self.posterior_spec, self.prior_spec)
        slots, priors = build_parameters(
            entries, specs, self.variational, self.posteriors, self._sampler, verbose or bool(debug)
        )
        self._slots: list[Slot] = slots
        self.priors = nn.ModuleList(priors)
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

    # ------------------------------------------------------------------ forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the wrapped module with one fresh sample of every reparametrized weight."""
        draw = self._sampler.begin()
        try:
            return self.module(*args, **kwargs)
        finally:
            self._sampler.end(draw)

    @contextmanager
    def _sampler_state(self, attribute: str, value: Any) -> Iterator[None]:
        previous = getattr(self._sampler, attribute)
        setattr(self._sampler, attribute, value)
        try:
            yield
        finally:
            setattr(self._sampler, attribute, previous)

    def mean_weights(self) -> AbstractContextManager[None]:
        """Context in which forward passes use the posterior means (deterministic)."""
        return self._sampler_state("mode", "mean")

    def frozen_sample(self) -> AbstractContextManager[None]:
        """Context in which every forward pass reuses one weight sample.

        The noise is drawn once on entry; each pass recomputes the weights from it,
        so gradients reach the current `mu` and `rho` and several backward passes work.
        """
        return self._sampler_state("frozen", self._sampler.freeze())

    def given_weights(self, values: Mapping[str, Tensor]) -> AbstractContextManager[None]:
        """Context in which forward passes use `values` (by parameter name) as the weights.

        The other parameters are sampled as usual. Gradients flow to the given tensors,
        not to the posterior: run the model with weights of your choice, or check with
        leaf tensors that every weight reaches the output (`bnnify.bnn.reach`).

        Raises:
            InvalidArgumentError: For a name that is not reparametrized, or a shape
                that is not the parameter's.
        """
        slots = {alias: slot for slot in self._slots for alias in slot.aliases}
        given = {}
        for name, value in values.items():
            slot = slots.get(name)
            if slot is None or tuple(value.shape) != tuple(slot.shape):
                what = "is not reparametrized" if slot is None else f"has shape {slot.shape}"
                raise InvalidArgumentError(f"{name!r} {what}: cannot give it {value.shape}")
            given[id(slot)] = value
        return self._sampler_state("given", given)

    def local_reparameterization(self, enabled: bool = True) -> AbstractContextManager[None]:
        """Context switching the local reparameterization trick on (or off)."""
        return self._sampler_state("local", bool(enabled))

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
    def predict_samples(self, *inputs: Any, num_samples: int, **kwargs: Any) -> Tensor:
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
        says which estimator is used, and why. Several inputs, or keyword arguments,
        are passed as they are to every pass (one pass per sample).
        """
        if num_samples < 1:
            raise InvalidArgumentError(f"num_samples must be >= 1, got {num_samples!r}")
        choice = self.predictive_estimator(*inputs, **kwargs)
        one_tensor = len(inputs) == 1 and isinstance(inputs[0], Tensor) and not kwargs
        lrt = choice.estimator is Estimator.LOCAL_REPARAMETERIZATION
        if lrt and one_tensor and not self._batch_refusal():
            output = self._sampler.repeated_pass(self.module, inputs, num_samples)
            if output is not None:
                return output
            # Only under the user's assertion (a Linear fed 3-D inputs sampled weights).
            assert self._sampler.local, "the row-wise proof admitted a weight-sampling pass"
        return torch.stack([self(*inputs, **kwargs) for _ in range(num_samples)])

    @property
    def noise(self) -> str:
        """The training steps' weight noise, "fresh" or "shifted" (settable; see `noise=`)."""
        return self._noise.value

    @noise.setter
    def noise(self, value: str) -> None:
        self._noise = NoiseMode.parse(value)
        for fused in self._sampler.fused:
            fused.noise = self._noise

    def training_kernels(self) -> list[str]:
        """How a training pass samples each flat store now: "compiled" or "eager (why)".

        Example:
            >>> BayesianModule(nn.Linear(3, 2)).training_kernels()
            ['eager (8 elements, fewer than the 1048576 worth compiling)']
        """
        return [f"eager ({r})" if (r := f.refusal()) else "compiled" for f in self._sampler.fused]

    def predictive_estimator(self, *inputs: Any, **kwargs: Any) -> EstimatorChoice:
        """The estimator `predict_samples(*inputs, ...)` uses, with the reason.

        Example:
            >>> mlp = BayesianModule(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)))
            >>> mlp.predictive_estimator(torch.zeros(5, 3)).estimator.value
            'local_reparameterization'
            >>> mlp.predictive_estimator(torch.zeros(5, 2, 3)).reason
            'the input has shape (5, 2, 3), not (batch, features)'
        """
        sampler = self._sampler
        fixed = sampler.frozen is not None or sampler.given is not None
        modes = (sampler.mode, fixed, sampler.local)
        return choose_estimator(modes, self._batch_refusal, self.module, inputs, kwargs)

    def _batch_refusal(self) -> str | None:
        """Why one batched local-trick pass cannot serve all samples, or None."""
        slots = self._divergence.store_slots
        return batch_refusal(slots, self._sampler.lrt_ends, self._slots)

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
        return gather_state(self._slots, self.variational, self.posteriors, self.priors)

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
        return copy_state_(self.variational_state(), state, strict=strict)

    def posterior_distribution(self, name: str) -> Distribution:
        """The posterior of parameter `name` as a distribution (views of the storage)."""
        for slot in self._slots:
            if name in slot.aliases:
                return self._distribution(slot)
        raise InvalidArgumentError(
            f"{name!r} is not a reparametrized parameter",
            hint=f"Reparametrized: {', '.join(self.reparametrized_names()[:10])}.",
        )

    def _distribution(self, slot: Slot) -> Distribution:
        if slot.store is None:
            return self.posteriors[slot.index].distribution
        store = self.variational[slot.store]
        start, end = store.span(slot.index)
        sigma = store.sigma(start, end).view(slot.shape)
        return Normal(store.view(store.mu, slot.index), sigma)

    # ------------------------------------------ public view for the upper layers

    @property
    def device(self) -> torch.device:
        """Device of the KL result (of the `_kl_meta` buffer, which follows `.to()`)."""
        return self._kl_meta.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the KL result (of the `_kl_meta` buffer, which follows `.to()`)."""
        return self._kl_meta.dtype

    def variational_parameters(self) -> Iterator[nn.Parameter]:
        """The posteriors' trainable parameters (not the parameters kept deterministic)."""
        for store in self.variational:
            yield from store.parameters()
        yield from self.posteriors.parameters()

    def reparametrized_parameters(self) -> Iterator[Reparametrized]:
        """Every reparametrized parameter with its posterior and prior, in storage order."""
        for slot, prior in zip(self._slots, self.priors, strict=True):
            yield Reparametrized(
                slot.name, tuple(slot.aliases), slot.shape, self._distribution(slot), prior
            )

    def extra_repr(self) -> str:
        return (
            f"posterior={self.posterior_spec[0]!r}, prior={self.prior_spec[0]!r}, "
            f"parameters={len(self._slots)}, elements={self.num_variational_elements}"
        )


def _refresh_segments(module: BayesianModule, incompatible_keys: Any) -> None:
    module._divergence.refresh()
