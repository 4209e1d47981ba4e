"""genexp: a Hydra-configured experiment runner for deep generative image models."""

__version__ = "0.1.0"
