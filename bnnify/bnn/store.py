"""Flat storage of many Gaussian posteriors, sampled by one fused kernel."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnnify.bnn.noise import standard_normal
from bnnify.errors import FormatError

__all__ = ["GaussianStore", "gaussian_sample"]

_CHUNK = 1 << 18


class _GaussianSample(torch.autograd.Function):
    """w = mu + softplus(rho) * eps, saving only rho and eps for the backward pass.

    When the noise belongs to this sample (`owned`), the backward pass writes the
    gradient of rho into it: no new tensor of the model's size, whose first touch
    costs a page fault per 4 KB (most of a CPU step's time otherwise).
    """

    @staticmethod
    def forward(ctx: Any, mu: Tensor, rho: Tensor, eps: Tensor, store: Any, owned: bool) -> Tensor:
        ctx.save_for_backward(rho, eps)
        ctx.store, ctx.owned, ctx.spent = store, owned, False
        sigma = F.softplus(rho)
        if store is not None:
            store.remember_sigma(rho, sigma)
        return torch.addcmul(mu, sigma, eps)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None, None]:
        if ctx.spent:
            raise RuntimeError(
                "backward through the same bnnify weight sample twice: its noise was "
                "consumed by the first pass; to reuse a sample, run the forward pass "
                "again inside `with model.frozen_sample():`"
            )
        rho, eps = ctx.saved_tensors
        if ctx.store is not None:
            # The step that follows changes rho, in place and (fused Adam) without
            # bumping its version: the cached sigma must not outlive this pass.
            ctx.store.forget_sigma()
            ctx.store = None
        if torch.is_grad_enabled():
            # create_graph=True: a gradient that is itself differentiable (double
            # backward), built from autograd ops, the noise left intact.
            return grad, grad * torch.sigmoid(rho) * eps, None, None, None
        grad_rho = eps if ctx.owned else torch.empty_like(rho)
        ctx.spent = ctx.owned
        # d softplus(rho) / d rho = sigmoid(rho); chunks keep the three passes in cache.
        for a in range(0, rho.numel(), _CHUNK):
            b = min(a + _CHUNK, rho.numel())
            chunk = grad_rho[a:b]
            if ctx.owned:
                chunk.mul_(grad[a:b]).mul_(torch.sigmoid(rho[a:b]))
            else:
                torch.sigmoid(rho[a:b], out=chunk).mul_(eps[a:b]).mul_(grad[a:b])
        return grad, grad_rho, None, None, None


def gaussian_sample(
    mu: Tensor, rho: Tensor, eps: Tensor, store: Any = None, *, owned: bool = False
) -> Tensor:
    """Reparameterized sample `mu + softplus(rho) * eps`, differentiable in mu and rho.

    With `store`, when gradients are being recorded, the sigma computed on the way is
    offered to `store.remember_sigma` so that a KL divergence computed in the same
    step (before the backward pass) reuses it. `owned=True` lets the backward pass
    overwrite `eps` (made for this sample alone) with the gradient of `rho`.
    """
    if torch.compiler.is_compiling():
        return mu + F.softplus(rho) * eps
    if not (torch.is_grad_enabled() and rho.requires_grad):
        store = None
    return _GaussianSample.apply(mu, rho, eps, store, owned)


class GaussianStore(nn.Module):
    """The means and scales of many Gaussian posteriors in two flat parameters.

    Slot `i` holds the parameter `names[i]` of shape `shapes[i]` at elements
    `offsets[i]:offsets[i] + numels[i]` of the flat `mu` and `rho`. Sampling, the KL
    divergence and the optimizer then run a few large kernels instead of a Python
    loop per tensor. All slots share one dtype and device.

    Args:
        names: Parameter names, one per slot.
        shapes: Parameter shapes, one per slot.
        dtype: Dtype of the storage.
        device: Device of the storage.
    """

    def __init__(
        self,
        names: Sequence[str],
        shapes: Sequence[torch.Size],
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.names = list(names)
        self.shapes = [torch.Size(shape) for shape in shapes]
        self.numels = [shape.numel() for shape in self.shapes]
        self.offsets = [0]
        for numel in self.numels:
            self.offsets.append(self.offsets[-1] + numel)
        total = self.offsets[-1]
        self.mu = nn.Parameter(torch.empty(total, dtype=dtype, device=device))
        self.rho = nn.Parameter(torch.empty(total, dtype=dtype, device=device))
        self._sigma_cache: tuple[int, int, Tensor] | None = None
        self.register_load_state_dict_pre_hook(_check_layout_first)

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def span(self, index: int) -> tuple[int, int]:
        """Flat element range `[start, end)` of slot `index`."""
        return self.offsets[index], self.offsets[index + 1]

    def view(self, flat: Tensor, index: int) -> Tensor:
        """Slot `index` of a flat tensor laid out like this store, in its shape."""
        start, end = self.span(index)
        return flat[start:end].view(self.shapes[index])

    def split(self, flat: Tensor, first: int = 0, last: int | None = None) -> list[Tensor]:
        """Slots `first:last` of `flat` (which holds exactly those), in their shapes.

        One autograd node for all slots: its backward is one concatenation, where a
        slice per slot would build a zero-filled gradient of the whole store each.
        """
        last = len(self.numels) if last is None else last
        parts = torch.split_with_sizes(flat, self.numels[first:last])
        shapes = self.shapes[first:last]
        return [part.view(shape) for part, shape in zip(parts, shapes, strict=True)]

    def noise(self, start: int = 0, end: int | None = None) -> Tensor:
        """Standard normal noise for elements `[start, end)`."""
        end = self.numel if end is None else end
        return standard_normal(end - start, self.mu.dtype, self.mu.device)

    def sample(self, start: int = 0, end: int | None = None, eps: Tensor | None = None) -> Tensor:
        """A reparameterized sample of elements `[start, end)`, flat."""
        end = self.numel if end is None else end
        owned = eps is None
        if owned:
            eps = self.noise(start, end)
        if start == 0 and end == self.numel:
            return gaussian_sample(self.mu, self.rho, eps, self, owned=owned)
        return gaussian_sample(self.mu[start:end], self.rho[start:end], eps, owned=owned)

    def remember_sigma(self, rho: Tensor, sigma: Tensor) -> None:
        """Keeps softplus(rho) for reuse while `rho` is unchanged."""
        if rho is self.rho:
            self._sigma_cache = (rho._version, rho.data_ptr(), sigma)

    def forget_sigma(self) -> None:
        self._sigma_cache = None

    def cached_sigma(self) -> Tensor | None:
        """softplus(rho) of the whole store, if computed by this step's forward pass.

        Valid from a training forward pass until its backward pass (which clears
        it); the version check also catches in-place changes that bump it.
        """
        cache = self._sigma_cache
        if cache is None:
            return None
        version, pointer, sigma = cache
        if version != self.rho._version or pointer != self.rho.data_ptr():
            self._sigma_cache = None
            return None
        return sigma

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_sigma_cache"] = None
        return state

    def sigma(self, start: int = 0, end: int | None = None) -> Tensor:
        """softplus(rho) of elements `[start, end)`, flat."""
        end = self.numel if end is None else end
        rho = self.rho if start == 0 and end == self.numel else self.rho[start:end]
        return F.softplus(rho)

    def layout(self) -> dict[str, Any]:
        """The slots' names and shapes: what a state dict must match to be loaded."""
        return {"names": list(self.names), "shapes": [list(shape) for shape in self.shapes]}

    def get_extra_state(self) -> Tensor:
        # A uint8 tensor of JSON, not a dict: a state dict must hold tensors only
        # (safetensors.torch.save_file refuses anything else).
        data = json.dumps(self.layout(), separators=(",", ":")).encode()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()

    def set_extra_state(self, state: Any) -> None:
        layout = _decode_layout(state)
        shapes = [torch.Size(shape) for shape in layout["shapes"]]
        if list(layout["names"]) != self.names or shapes != self.shapes:
            diff = sorted(set(layout["names"]).symmetric_difference(self.names))
            raise FormatError(
                "the state_dict was saved from a BayesianModule with other reparametrized "
                f"parameters (differing: {diff[:5] or 'shapes or order'})",
                hint="Build the BayesianModule with the same architecture, posterior, prior "
                "and include/exclude patterns as the one that was saved.",
            )

    def extra_repr(self) -> str:
        return f"slots={len(self.names)}, numel={self.numel}, dtype={self.mu.dtype}"


def _check_layout_first(module: GaussianStore, state_dict: Any, prefix: str, *args: Any) -> None:
    """Refuses another layout before torch copies `mu` and `rho` (which come first)."""
    key = prefix + "_extra_state"
    if key in state_dict:
        module.set_extra_state(state_dict[key])


def _decode_layout(state: Any) -> dict[str, Any]:
    """The layout in a saved extra state: JSON in a uint8 tensor (a dict in older files)."""
    layout = state
    if isinstance(state, Tensor) and state.dtype == torch.uint8 and state.dim() == 1:
        try:
            layout = json.loads(bytes(state.tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            layout = None
    if not isinstance(layout, dict) or "names" not in layout or "shapes" not in layout:
        shown = f"tensor {state.dtype} {tuple(state.shape)}" if isinstance(state, Tensor) else state
        raise FormatError(f"malformed flat-store layout in state_dict: {shown!r}")
    return layout
