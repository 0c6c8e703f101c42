"""The names of a Bayesian parameter's tensors: `<param>.<role>` and `<param>.prior.<buffer>`.

`BayesianModule.variational_state`, the checkpoint files and every reader of them
name tensors through these functions only.
"""

from __future__ import annotations

__all__ = ["posterior_key", "prior_key", "split_key"]

_PRIOR = "prior"


def posterior_key(param: str, role: str) -> str:
    """The key of the posterior tensor `role` ("mu", "rho", ...) of parameter `param`.

    Example:
        >>> posterior_key("fc.weight", "mu")
        'fc.weight.mu'
    """
    return f"{param}.{role}"


def prior_key(param: str, buffer: str) -> str:
    """The key of the prior tensor `buffer` of parameter `param`.

    Example:
        >>> prior_key("fc.weight", "mu")
        'fc.weight.prior.mu'
    """
    return f"{param}.{_PRIOR}.{buffer}"


def split_key(key: str, param: str) -> tuple[str, str] | None:
    """`("posterior", role)` or `("prior", buffer)` when `key` names a tensor of `param`.

    Returns None for the keys of other parameters.

    Example:
        >>> split_key("fc.weight.prior.mu", "fc.weight"), split_key("fc.bias.mu", "fc.weight")
        (('prior', 'mu'), None)
    """
    prefix = f"{param}."
    if not key.startswith(prefix) or len(key) == len(prefix):
        return None
    rest = key[len(prefix) :]
    kind, dot, buffer = rest.partition(".")
    if kind == _PRIOR and dot and buffer:
        return _PRIOR, buffer
    return "posterior", rest
