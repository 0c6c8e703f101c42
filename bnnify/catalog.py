"""The built-in posteriors and priors, described without importing torch (for `bnnify list`).

`tests/test_catalog.py` checks this table against the live registries, so it
cannot drift from the code.
"""

from __future__ import annotations

import math

__all__ = ["POSTERIORS", "PRIORS"]

# name -> (aliases, class name, {argument: default}, one-line description)
POSTERIORS: dict[str, tuple[tuple[str, ...], str, dict[str, object], str]] = {
    "gaussian": (
        ("normal",),
        "GaussianPosterior",
        {"mu_std": 0.1, "rho": -3.0, "sigma": None},
        "N(mu, softplus(rho)^2); mu ~ N(0, mu_std^2) at start (discards the weights)",
    ),
    "pretrained_gaussian": (
        ("pretrained_normal",),
        "PretrainedGaussianPosterior",
        {"rho": None, "sigma": None, "delta": None, "min_sigma": 1e-6},
        "N(w, sigma^2) starting at the trained weights; one of sigma = delta*|w| (MOPED), "
        "a constant sigma, or softplus(rho) (default rho=-3); floored at min_sigma",
    ),
}

PRIORS: dict[str, tuple[tuple[str, ...], str, dict[str, object], str]] = {
    "gaussian": (
        ("normal",),
        "GaussianPrior",
        {"mu": 0.0, "sigma": 1.0},
        "N(mu, sigma^2); closed-form KL",
    ),
    "empirical_gaussian": (
        (),
        "EmpiricalGaussianPrior",
        {"sigma": 1.0},
        "N(w0, sigma^2) centred on the pretrained weights (empirical Bayes); closed-form KL",
    ),
    "laplace": (
        (),
        "LaplacePrior",
        {"mu": 0.0, "scale": 1.0},
        "Laplace(mu, scale); closed-form KL from a Gaussian posterior",
    ),
    "scale_mixture": (
        (),
        "ScaleMixturePrior",
        {"pi": 0.5, "sigma1": 1.0, "sigma2": math.exp(-6)},
        "pi N(0, sigma1^2) + (1 - pi) N(0, sigma2^2) (Blundell et al.); Monte Carlo KL",
    ),
}
