"""bnnify's core library: Bayes by Backprop for any `nn.Module`, in place."""

from bnnify.bnn.module import BayesianModule
from bnnify.bnn.posteriors import (
    GaussianPosterior,
    NormalPosterior,
    PosteriorFactory,
    PretrainedGaussianPosterior,
    PretrainedNormalPosterior,
    VariationalPosterior,
    get_posterior,
)
from bnnify.bnn.priors import (
    EmpiricalGaussianPrior,
    GaussianPrior,
    LaplacePrior,
    NormalPrior,
    Prior,
    PriorFactory,
    ScaleMixturePrior,
    get_prior,
)
from bnnify.bnn.reparametrize import is_reparametrized
from bnnify.bnn.rowwise import Estimator, EstimatorChoice

__all__ = [
    "BayesianModule",
    "EmpiricalGaussianPrior",
    "Estimator",
    "EstimatorChoice",
    "GaussianPosterior",
    "GaussianPrior",
    "LaplacePrior",
    "NormalPosterior",
    "NormalPrior",
    "PosteriorFactory",
    "PretrainedGaussianPosterior",
    "PretrainedNormalPosterior",
    "Prior",
    "PriorFactory",
    "ScaleMixturePrior",
    "VariationalPosterior",
    "get_posterior",
    "get_prior",
    "is_reparametrized",
]
