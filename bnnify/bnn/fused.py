"""The compiled training step of a flat store: sample, KL and their backward in one node.

In a training forward pass `FusedSampler` samples every weight of a store with
one compiled kernel that also reduces the closed-form KL to scalar Gaussian priors,
and returns the per-parameter weights and the KL from one autograd node. Its
backward pass receives each parameter's gradient where autograd left it (no
concatenation into a flat gradient) and the KL's gradient, and writes the
gradients of `mu` and `rho`, both terms at once, in one pass per large parameter.
`kl_divergence()` then returns the KL computed here instead of another pass.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bnnify.bnn import kernels
from bnnify.bnn.noise import Lease, NoisePool, ShiftedNoise
from bnnify.bnn.store import GaussianStore
from bnnify.enums import NoiseMode

__all__ = ["MIN_COMPILE_NUMEL", "FusedSampler"]

# Stores smaller than this are sampled by the eager kernels unless compiling is
# forced: compiling takes seconds once and saves little per step on them
# (measurements in benchmarks/RESULTS.md).
MIN_COMPILE_NUMEL = 1 << 20
SMALL_SLOT = 1 << 16

SPENT = (
    "backward through the same bnnify weight sample twice: its noise was consumed by "
    "the first pass; to reuse a sample, run the forward pass again inside "
    "`with model.frozen_sample():`"
)


@dataclass(frozen=True)
class _Prior:
    """Store elements `[start, end)` under the scalar Gaussian prior N(m, s^2)."""

    start: int
    end: int
    m: float
    s: float


def _plain(t: Tensor, start: int, end: int) -> Tensor:
    """Elements `[start, end)` of a 1-D contiguous `t`, as a tensor that is no view.

    The compiled kernels take plain tensors: torch.compile guards a view on its
    base's shape, which would compile again for every new kind of base.
    """
    chunk = torch.empty(0, dtype=t.dtype, device=t.device)
    return chunk.set_(t.untyped_storage(), t.storage_offset() + start, (end - start,))


def _runs(numels: list[int], priors: list[int]) -> list[tuple[int, int, int]]:
    """`(first, end, prior)` slot ranges for the backward kernels.

    A large slot is a run of its own: its gradient is read where autograd left it.
    Neighbouring small slots under one prior form one run, their gradients joined
    first: a kernel call costs more than copying a few thousand numbers.
    """
    runs: list[tuple[int, int, int]] = []
    for i, (numel, prior) in enumerate(zip(numels, priors, strict=True)):
        previous = runs[-1] if runs else None
        small = numel < SMALL_SLOT
        if previous and small and previous[2] == prior and numels[previous[1] - 1] < SMALL_SLOT:
            runs[-1] = (previous[0], i + 1, prior)
        else:
            runs.append((i, i + 1, prior))
    return runs


class _Noise:
    """One step's noise, lent until its backward pass: a buffer of normals, or a shift
    `(offset, seed)` of the shifted pool (then `lease` holds the pool)."""

    def __init__(
        self, lease: Lease, shifted: ShiftedNoise | None = None, shift: tuple[int, int] = (0, 0)
    ):
        self.lease = lease
        self.shifted = shifted
        self.offset, self.seed = shift

    def pieces(self, start: int, end: int) -> list[tuple[int, int, tuple[Tensor, ...]]]:
        """`(a, b, noise)` chunks covering `[start, end)`, in the form the kernels take."""
        if self.shifted is None:
            return [(start, end, (_plain(self.lease.tensor, start, end),))]
        pool = self.shifted.pool
        seed = torch.tensor(self.seed, device=pool.device)
        return [
            (a, b, (_plain(pool, p, p + b - a), torch.tensor(a, device=pool.device), seed))
            for a, b, p in self.shifted.pieces(start, end, self.offset)
        ]

    def full(self, numel: int) -> Tensor:
        if self.shifted is None:
            return self.lease.tensor
        return self.shifted.eps(0, numel, self.offset, self.seed)

    def release(self) -> None:
        self.lease.release()


class _FusedStep(torch.autograd.Function):
    """(KL, *weights) of one store from `mu` and `rho`; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, mu: Tensor, rho: Tensor, sampler: FusedSampler, noise: _Noise) -> Any:
        w = torch.empty_like(mu)
        kl = sampler.forward_kernels(mu, rho, noise, w, with_kl=True)
        ctx.sampler, ctx.noise, ctx.spent = sampler, noise, False
        # The noise (or the shifted pool) is saved so that autograd checks, by its
        # version, that nothing refilled it before this sample's backward pass.
        ctx.save_for_backward(mu, rho, noise.lease.tensor)
        return (kl, *sampler.store.split(w))

    @staticmethod
    def backward(ctx: Any, grad_kl: Tensor, *grads: Tensor) -> tuple:
        if ctx.spent:
            raise RuntimeError(SPENT)
        mu, rho = ctx.saved_tensors[:2]
        sampler, noise = ctx.sampler, ctx.noise
        sampler.forget_kl(ctx)
        if torch.is_grad_enabled():
            # create_graph=True: differentiable gradients, for double backward.
            return (*sampler.differentiable_grads(mu, rho, noise, grad_kl, grads), None, None)
        grad_mu, grad_rho = sampler.backward_kernels(mu, rho, noise, grad_kl, grads)
        noise.release()
        ctx.spent = True
        return grad_mu, grad_rho, None, None


class _FusedKL(torch.autograd.Function):
    """The KL of a store with no sample of this step to carry it: compiled, both passes."""

    @staticmethod
    def forward(ctx: Any, mu: Tensor, rho: Tensor, sampler: FusedSampler) -> Tensor:
        ctx.sampler = sampler
        ctx.save_for_backward(mu, rho)
        total = torch.zeros((), dtype=torch.float64, device=mu.device)
        for prior in sampler.priors:
            constants = torch.tensor([prior.m, 1 / prior.s**2], dtype=mu.dtype, device=mu.device)
            chunks = [_plain(t, prior.start, prior.end) for t in (mu, rho)]
            total += kernels.run(kernels.kl, *chunks, constants)
            total += (prior.end - prior.start) * (math.log(prior.s) - 0.5)
        return total

    @staticmethod
    def backward(ctx: Any, grad_kl: Tensor) -> tuple:
        mu, rho = ctx.saved_tensors
        sampler = ctx.sampler
        if torch.is_grad_enabled():
            return (*sampler.differentiable_kl_grads(mu, rho, grad_kl), None)
        grad_mu, grad_rho = torch.empty_like(mu), torch.empty_like(rho)
        g = float(grad_kl)
        for prior in sampler.priors:
            coef = torch.tensor([g / prior.s**2, g, prior.m], dtype=mu.dtype, device=mu.device)
            chunks = [_plain(t, prior.start, prior.end) for t in (mu, rho, grad_mu, grad_rho)]
            kernels.run(kernels.kl_grads, chunks[0], chunks[1], coef, *chunks[2:])
        return grad_mu, grad_rho, None


class FusedSampler:
    """Samples one `GaussianStore` by the compiled kernels of `bnnify.bnn.kernels`.

    Args:
        store: The flat store.
        noise: How each step's noise is drawn (`NoiseMode`).
        compile: True compiles whatever the store's size, False never, None above
            `MIN_COMPILE_NUMEL` elements (`BNNIFY_COMPILE=1` forces, `=0` forbids).
    """

    def __init__(
        self, store: GaussianStore, noise: NoiseMode = NoiseMode.FRESH, compile: bool | None = None
    ):
        self.store = store
        self.noise = noise
        self.compile = compile
        self.priors: list[_Prior] | None = None
        self.runs: list[tuple[int, int, int]] = []
        self.buffers = NoisePool()
        self._refusal: tuple[Any, str | None] | None = None
        self.shifted: ShiftedNoise | None = None
        self._kl: tuple[Tensor, Any, tuple[int, ...]] | None = None

    def configure(self, segments: list[Any]) -> None:
        """Fuses the KL when every segment of the store has a scalar Gaussian prior."""
        self._kl = None
        covered = sum(s.end - s.start for s in segments) == self.store.numel
        if not segments or not covered or any(s.gaussian is None for s in segments):
            self.priors = None
            slot_priors = [0] * len(self.store.numels)
        else:
            self.priors = [_Prior(s.start, s.end, *s.gaussian) for s in segments]
            starts = [p.start for p in self.priors]
            slot_priors = [
                max(i for i, start in enumerate(starts) if start <= offset)
                for offset in self.store.offsets[:-1]
            ]
        self.runs = _runs(self.store.numels, slot_priors)

    # ------------------------------------------------------------------ choice

    def refusal(self) -> str | None:
        """Why this store is sampled by the eager kernels now, or None."""
        if torch.compiler.is_compiling():
            return "inside torch.compile"
        mu = self.store.mu
        key = (mu.dtype, mu.device, mu.numel(), self.compile, kernels.environment())
        if self._refusal is None or self._refusal[0] != key:
            self._refusal = (key, self._why_not(mu))
        return self._refusal[1]

    def _why_not(self, mu: Tensor) -> str | None:
        if self.compile is False:
            return "compile_kernels=False"
        if mu.dtype not in kernels.compiled_dtypes():
            return f"dtype {str(mu.dtype).removeprefix('torch.')}"
        forced = self.compile or os.environ.get(kernels.COMPILE_ENV, "").strip() == "1"
        if not forced and mu.numel() < MIN_COMPILE_NUMEL:
            return f"{mu.numel()} elements, fewer than the {MIN_COMPILE_NUMEL} worth compiling"
        return kernels.compile_refusal(mu.device)

    def active(self) -> bool:
        """Whether a whole-store sample goes through the compiled kernels (logged once)."""
        if torch.compiler.is_compiling():
            return False  # the caller's own torch.compile traces the eager formulas
        reason = self.refusal()
        what = f"store of {self.store.numel} {str(self.store.mu.dtype).removeprefix('torch.')}"
        if reason is None:
            kernels.note_once("%s elements: compiled training kernels", what)
        else:
            kernels.note_once("%s elements: eager training kernels (%s)", what, reason)
        return reason is None

    # ---------------------------------------------------------------- sampling

    def sample(self) -> list[Tensor]:
        """One sample of every slot, in its shape; with the KL node when training."""
        store = self.store
        training = torch.is_grad_enabled() and (store.mu.requires_grad or store.rho.requires_grad)
        # Shifted noise serves gradient steps only: predictions always draw fresh noise.
        noise = self._draw(self.noise if training else NoiseMode.FRESH)
        if not training:
            with torch.no_grad():
                w = torch.empty_like(store.mu)
                self.forward_kernels(store.mu, store.rho, noise, w, with_kl=False)
            noise.release()
            return store.split(w)
        kl, *parts = _FusedStep.apply(store.mu, store.rho, self, noise)
        if self.priors is not None:
            mu, rho = store.mu, store.rho
            self._kl = (kl, kl.grad_fn, (mu._version, rho._version, mu.data_ptr(), rho.data_ptr()))
        return parts

    def kl(self) -> Tensor | None:
        """The store's KL by the compiled kernels (None if the KL cannot be fused)."""
        if self.priors is None:
            return None
        kl = self.take_kl()
        return _FusedKL.apply(self.store.mu, self.store.rho, self) if kl is None else kl

    def take_kl(self) -> Tensor | None:
        """The KL of this step's training sample, if nothing changed since; else None."""
        if self._kl is None:
            return None
        kl, _, stamp = self._kl
        mu, rho = self.store.mu, self.store.rho
        if stamp != (mu._version, rho._version, mu.data_ptr(), rho.data_ptr()):
            self._kl = None
            return None
        return kl if torch.is_grad_enabled() else kl.detach()

    def forget_kl(self, node: Any) -> None:
        # The step that follows changes rho, in place and (fused Adam) without
        # bumping its version: the KL must not outlive its backward pass.
        if self._kl is not None and self._kl[1] is node:
            self._kl = None

    def _draw(self, mode: NoiseMode) -> _Noise:
        mu = self.store.mu
        numel, dtype, device = mu.numel(), mu.dtype, mu.device
        if mode is NoiseMode.FRESH:
            return _Noise(lease=self.buffers.draw(numel, dtype, device))
        if self.shifted is None or not self.shifted.matches(numel, dtype, device):
            self.shifted = ShiftedNoise(numel, dtype, device)
        offset, seed, lease = self.shifted.step()
        return _Noise(lease, self.shifted, (offset, seed))

    # ----------------------------------------------------------------- kernels

    def forward_kernels(
        self, mu: Tensor, rho: Tensor, noise: _Noise, w: Tensor, with_kl: bool
    ) -> Tensor:
        """Writes the sample into `w`; returns the KL (float64, 0 when not fused)."""
        total = torch.zeros((), dtype=torch.float64, device=mu.device)
        if not with_kl or self.priors is None:
            for a, b, eps in noise.pieces(0, mu.numel()):
                chunks = [_plain(t, a, b) for t in (mu, rho)]
                kernels.run(kernels.sample, *chunks, eps, _plain(w, a, b))
            return total
        for prior in self.priors:
            constants = torch.tensor([prior.m, 1 / prior.s**2], dtype=mu.dtype, device=mu.device)
            for a, b, eps in noise.pieces(prior.start, prior.end):
                chunks = [_plain(t, a, b) for t in (mu, rho)]
                total += kernels.run(kernels.sample_kl, *chunks, eps, _plain(w, a, b), constants)
            total += (prior.end - prior.start) * (math.log(prior.s) - 0.5)
        return total

    def backward_kernels(
        self, mu: Tensor, rho: Tensor, noise: _Noise, grad_kl: Tensor, grads: tuple[Tensor, ...]
    ) -> tuple[Tensor, Tensor]:
        """The gradients of mu and rho, written run by run from the slots' own gradients."""
        grad_mu, grad_rho = torch.empty_like(mu), torch.empty_like(rho)
        g = float(grad_kl) if self.priors is not None else 0.0
        coefs = [
            torch.tensor([g / p.s**2, g, p.m], dtype=mu.dtype, device=mu.device)
            for p in self.priors or [_Prior(0, 0, 0.0, 1.0)]
        ]
        offsets = self.store.offsets
        for first, last, prior in self.runs:
            start, end = offsets[first], offsets[last]
            if last - first == 1:
                flat = grads[first].reshape(-1)
            else:  # small slots: one cheap concatenation, then one kernel call
                flat = torch.cat([grads[i].reshape(-1) for i in range(first, last)])
            for a, b, eps in noise.pieces(start, end):
                chunk = _plain(flat, a - start, b - start)
                params = [_plain(t, a, b) for t in (mu, rho)]
                outs = [_plain(t, a, b) for t in (grad_mu, grad_rho)]
                kernels.run(kernels.grads, chunk, *params, eps, coefs[prior], *outs)
        return grad_mu, grad_rho

    def differentiable_grads(
        self, mu: Tensor, rho: Tensor, noise: _Noise, grad_kl: Tensor, grads: tuple[Tensor, ...]
    ) -> tuple[Tensor, Tensor]:
        """The same gradients built from autograd ops (model-sized temporaries)."""
        g = torch.cat([grad.reshape(-1) for grad in grads])
        grad_mu, grad_rho = g, g * noise.full(mu.numel()) * torch.sigmoid(rho)
        if self.priors is not None:
            kl_mu, kl_rho = self.differentiable_kl_grads(mu, rho, grad_kl)
            grad_mu, grad_rho = grad_mu + kl_mu, grad_rho + kl_rho
        return grad_mu, grad_rho

    def differentiable_kl_grads(
        self, mu: Tensor, rho: Tensor, grad_kl: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The KL's gradients built from autograd ops, for double backward."""
        sigma = F.softplus(rho)
        scale = grad_kl.to(mu.dtype)
        d_mu = torch.cat([(mu[p.start : p.end] - p.m) / p.s**2 for p in self.priors])
        d_sigma = torch.cat(
            [sigma[p.start : p.end] / p.s**2 - 1 / sigma[p.start : p.end] for p in self.priors]
        )
        return scale * d_mu, scale * d_sigma * torch.sigmoid(rho)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_kl"] = None
        state["buffers"] = NoisePool()
        return state
