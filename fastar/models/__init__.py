"""Whole models: training forward, likelihoods and generation.

Each family's file registers its :class:`fastar.models.spec.ModelSpec`; importing it here is the
one line a new family adds.
"""
from fastar.models.spec import SPECS, ModelSpec, register
from fastar.models.pixelcnn import GatedPixelCNN, PixelCNN
from fastar.models.wavenet import WaveNet
from fastar.models.fvsbn import FVSBN
from fastar.models.pixelrnn import PixelRNN
from fastar.models.pixelcnnpp import PixelCNNpp
from fastar.models.pixelsnail import PixelSNAIL
from fastar.models.made import MADE
from fastar.models.nade import NADE, RNADE

__all__ = ["WaveNet", "PixelCNN", "GatedPixelCNN", "FVSBN", "PixelRNN", "PixelCNNpp", "PixelSNAIL", "MADE", "NADE",
           "RNADE", "SPECS", "ModelSpec", "register"]
