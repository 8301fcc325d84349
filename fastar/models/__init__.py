"""Whole models: training forward, likelihoods and generation."""
from fastar.models.wavenet import WaveNet
from fastar.models.pixelcnn import GatedPixelCNN, PixelCNN

__all__ = ["WaveNet", "PixelCNN", "GatedPixelCNN"]
