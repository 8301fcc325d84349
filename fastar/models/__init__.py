"""Whole models: training forward, likelihoods and generation."""
from fastar.models.wavenet import WaveNet

__all__ = ["WaveNet"]
