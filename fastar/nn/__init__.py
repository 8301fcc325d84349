"""Drop-in ``nn.Module`` layers built on fastar ops."""
from fastar.nn.masked_conv import MaskedConv2d
from fastar.nn.masked_linear import MaskedLinear
from fastar.nn.causal_conv import CausalConv1d
from fastar.nn.gated import GatedMaskedConv2d
from fastar.nn.lstm import DiagonalBiLSTM, DiagonalLSTM, RowLSTM
from fastar.nn.heads import (Bernoulli, Categorical, Categorical256, DiscretizedMixLogistic, GaussianMixture, Head,
                             LogisticMixture)

__all__ = ["MaskedConv2d", "CausalConv1d", "GatedMaskedConv2d", "DiscretizedMixLogistic", "Categorical256",
           "Head", "Bernoulli", "Categorical", "LogisticMixture", "GaussianMixture",
           "RowLSTM", "DiagonalLSTM", "DiagonalBiLSTM", "MaskedLinear"]
