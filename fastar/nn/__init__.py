"""Drop-in ``nn.Module`` layers built on fastar ops."""
from fastar.nn.masked_conv import MaskedConv2d
from fastar.nn.causal_conv import CausalConv1d
from fastar.nn.gated import GatedMaskedConv2d
from fastar.nn.lstm import DiagonalBiLSTM, DiagonalLSTM, RowLSTM
from fastar.nn.heads import Categorical256, DiscretizedMixLogistic

__all__ = ["MaskedConv2d", "CausalConv1d", "GatedMaskedConv2d", "DiscretizedMixLogistic", "Categorical256",
           "RowLSTM", "DiagonalLSTM", "DiagonalBiLSTM"]
