"""fastar: layers, kernels and fast samplers for autoregressive generative models."""
from fastar._version import __version__
from fastar._backend import backend, get_backend, set_backend
from fastar._info import info
from fastar.selfcheck import check
from fastar import data, masks, models, nn, ops, sampling, threads

__all__ = ["__version__", "backend", "get_backend", "set_backend", "info", "check", "data", "masks", "ops", "nn", "models",
           "sampling", "threads"]
