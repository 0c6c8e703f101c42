"""bnnify: turn saved PyTorch models into Bayesian neural networks (Bayes by Backprop)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
