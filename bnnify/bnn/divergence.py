"""The KL divergence of a `BayesianModule`: which kernel serves which parameters.

Parameters in a flat Gaussian store are grouped in segments (neighbours under
equal scalar priors merged) that the fused kernels of `bnnify.bnn.kl_training` reduce; other
pairs go through `torch.distributions`, parameter by parameter.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Normal

from bnnify.bnn import kl_training as _kl
from bnnify.bnn.kl_report import gaussian_report_kl, parameter_kl
from bnnify.bnn.posteriors import GaussianPosterior
from bnnify.bnn.priors import Prior
from bnnify.bnn.reparametrize import Slot
from bnnify.bnn.store import GaussianStore
from bnnify.errors import InvalidArgumentError

__all__ = ["Divergence", "check_reduction", "check_samples"]


class Divergence:
    """Computes KL(posterior || prior) over the slots of a `BayesianModule`.

    Args:
        stores: The flat Gaussian stores.
        slots: Every reparametrized parameter, in storage order.
        priors: One prior per slot.
        posteriors: The standalone (non-flat) posteriors by slot key.
    """

    def __init__(
        self,
        stores: nn.ModuleList,
        slots: list[Slot],
        priors: nn.ModuleList,
        posteriors: nn.ModuleDict,
    ):
        self.stores = stores
        self.slots = slots
        self.priors = priors
        self.posteriors = posteriors
        self.store_slots = [
            [(i, s) for i, s in enumerate(slots) if s.store == k] for k in range(len(stores))
        ]
        self._standalone_closed: list[bool] | None = None
        self._prior_closed: dict[type, bool] = {}
        # Per store, its compiled sampler, whose training sample carries the KL.
        self.fused: list[Any] = []
        self.refresh()

    def refresh(self) -> None:
        """Rebuilds the segments (after the priors' values changed, e.g. on loading)."""
        self.segments = [self._merged(k) for k in range(len(self.stores))]
        if self.fused:
            for fused, segments in zip(self.fused, self.segments, strict=True):
                fused.configure(segments)

    def slot_segments(self, k: int) -> list[tuple[str, _kl.Segment]]:
        store = self.stores[k]
        segments = []
        for i, slot in self.store_slots[k]:
            start, end = store.span(slot.index)
            prior = self.priors[i]
            segments.append(
                (slot.name, _kl.Segment(start, end, prior, start, _kl.gaussian_scalars(prior)))
            )
        return segments

    def _merged(self, k: int) -> list[_kl.Segment]:
        """KL segments of store `k`; neighbours under equal scalar priors are merged."""
        merged: list[_kl.Segment] = []
        for _, seg in self.slot_segments(k):
            last = merged[-1] if merged else None
            if last and last.end == seg.start and _same_scalar_prior(last.prior, seg.prior):
                merged[-1] = _kl.Segment(last.start, seg.end, last.prior, last.base, last.gaussian)
            else:
                merged.append(seg)
        return merged

    def terms(self, samples: int | None, device: torch.device) -> dict[str, Tensor]:
        """KL terms by merged segment (training kernels, differentiable), float64."""
        self._check_closed_forms(samples)
        terms: dict[str, Tensor] = {}
        for k in range(len(self.stores)):
            fused = self._fused_kl(k) if samples is None else None
            if fused is not None:
                # Computed with this step's sample, its gradient fused with the sample's.
                terms[f"variational.{k}"] = fused.to(device)
                continue
            for segment in self.segments[k]:
                name = f"variational.{k}[{segment.start}]"
                terms[name] = self._segment_kl(k, segment, samples).to(device)
        for slot, posterior, prior in self._standalone():
            value = _kl.distribution_kl(posterior.distribution, prior.distribution, samples)
            terms[slot.name] = value.to(device, torch.float64)
        return terms

    def _fused_kl(self, k: int) -> Tensor | None:
        """Store `k`'s KL from its compiled sampler: carried by this step's sample, or
        computed by the compiled kernels when gradients are recorded; else None."""
        samplers = getattr(self, "fused", None)  # absent from modules pickled before it
        if not samplers or torch.compiler.is_compiling():
            return None
        sampler = samplers[k]
        kl = sampler.take_kl()
        if kl is None and torch.is_grad_enabled() and sampler.active():
            kl = sampler.kl()
        return kl

    def report(self, samples: int | None) -> dict[str, Tensor]:
        """KL of each parameter by the report function (fixed order), float64 on the CPU."""
        self._check_closed_forms(samples)  # before no_grad: warnings point at the caller
        values: dict[str, Tensor] = {}
        with torch.no_grad():
            for i, slot in enumerate(self.slots):
                prior = self.priors[i]
                if slot.store is None:
                    value = parameter_kl(self.posteriors[slot.index], prior, samples)
                else:
                    store = self.stores[slot.store]
                    mu, rho = (store.view(t, slot.index) for t in (store.mu, store.rho))
                    value = gaussian_report_kl(mu, rho, prior, samples)
                values[slot.name] = value.cpu()
        return values

    def _segment_kl(self, k: int, segment: _kl.Segment, samples: int | None) -> Tensor:
        store = self.stores[k]
        prior = segment.prior
        if samples is None and _kl.has_gaussian_closed_form(prior):
            sigma = store.cached_sigma() if len(self.segments[k]) == 1 else None
            if sigma is not None:
                store.forget_sigma()  # used once: nothing of the model's size outlives a step
            return _kl.store_kl(store.mu, store.rho, [segment], None, sigma)
        if samples is not None and _kl.has_flat_log_prob(prior):
            return _kl.store_kl(store.mu, store.rho, [segment], samples)
        # The prior has no fused kernel: per parameter, through torch.distributions.
        total = torch.zeros((), dtype=torch.float64, device=store.mu.device)
        for i, slot in self.store_slots[k]:
            start, end = store.span(slot.index)
            if segment.start <= start < segment.end:
                q = Normal(
                    store.view(store.mu, slot.index), store.sigma(start, end).view(slot.shape)
                )
                value = _kl.distribution_kl(q, self.priors[i].distribution, samples)
                total = total + value.to(torch.float64)
        return total

    def _check_closed_forms(self, samples: int | None) -> None:
        """Raises if a closed form is missing without samples; warns if MC replaces one."""
        pairs = []
        for k, store in enumerate(self.stores):
            for segment in self.segments[k]:
                closed = self._store_closed_form(store, segment.prior)
                pairs.append((GaussianPosterior.__name__, type(segment.prior).__name__, closed))
        if self._standalone_closed is None:
            self._standalone_closed = [
                _kl.pair_has_closed_form(q.distribution, p.distribution)
                for _, q, p in self._standalone()
            ]
        for (_, q, p), closed in zip(self._standalone(), self._standalone_closed, strict=True):
            pairs.append((type(q).__name__, type(p).__name__, closed))
        if samples is None:
            missing = sorted({f"{q} vs {p}" for q, p, closed in pairs if not closed})
            if missing:
                raise InvalidArgumentError(
                    f"no closed-form KL divergence is known for {', '.join(missing)}",
                    hint="Pass approx_num_samples=N (e.g. 16) for a Monte Carlo estimate.",
                )
        else:
            closed_pairs = sorted({f"{q} vs {p}" for q, p, closed in pairs if closed})
            if closed_pairs:
                _kl.monte_carlo_warning(", ".join(closed_pairs))

    def _store_closed_form(self, store: GaussianStore, prior: Prior) -> bool:
        if _kl.has_gaussian_closed_form(prior):
            return True
        # Checked once per prior class: building a prior's distribution may be costly.
        key = type(prior)
        if key not in self._prior_closed:
            self._prior_closed[key] = _kl.pair_has_closed_form(_probe(store), prior.distribution)
        return self._prior_closed[key]

    def _standalone(self) -> Iterator[tuple[Slot, nn.Module, Prior]]:
        for i, slot in enumerate(self.slots):
            if slot.store is None:
                yield slot, self.posteriors[slot.index], self.priors[i]


def _probe(store: GaussianStore) -> Distribution:
    return Normal(store.mu[:1].detach(), torch.ones_like(store.mu[:1]).detach())


def _same_scalar_prior(a: Prior, b: Prior) -> bool:
    if type(a) is not type(b):
        return False
    buffers_a, buffers_b = dict(a.named_buffers()), dict(b.named_buffers())
    if buffers_a.keys() != buffers_b.keys():
        return False
    return all(
        t.numel() == 1 and buffers_b[k].numel() == 1 and torch.equal(t, buffers_b[k])
        for k, t in buffers_a.items()
    )


def check_reduction(reduction: Any) -> str:
    value = reduction.lower() if isinstance(reduction, str) else reduction
    if value not in ("sum", "mean"):
        raise InvalidArgumentError(
            f"invalid reduction {reduction!r}", hint="Choose 'sum' or 'mean'."
        )
    return value


def check_samples(samples: Any) -> int | None:
    if samples is None:
        return None
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InvalidArgumentError(
            f"approx_num_samples must be a positive integer, got {samples!r}"
        )
    return samples
