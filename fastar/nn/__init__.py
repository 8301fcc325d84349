"""Drop-in ``nn.Module`` layers built on fastar ops."""
from fastar.nn.masked_conv import MaskedConv2d
from fastar.nn.masked_linear import MaskedLinear
from fastar.nn.causal_conv import CausalConv1d
from fastar.nn.gated import GatedMaskedConv2d
from fastar.nn.shifted import (NIN, DownRightShiftedConv2d, DownRightShiftedConvTranspose2d, DownShiftedConv2d,
                               DownShiftedConvTranspose2d, GatedResnet, concat_elu)
from fastar.nn.attention import CausalSelfAttention2d
from fastar.nn.lstm import DiagonalBiLSTM, DiagonalLSTM, RowLSTM
from fastar.nn.heads import (Bernoulli, Categorical, Categorical256, DiscretizedMixLogistic, GaussianMixture, Head,
                             LogisticMixture)

__all__ = ["MaskedConv2d", "CausalConv1d", "GatedMaskedConv2d", "DiscretizedMixLogistic", "Categorical256",
           "Head", "Bernoulli", "Categorical", "LogisticMixture", "GaussianMixture",
           "RowLSTM", "DiagonalLSTM", "DiagonalBiLSTM", "CausalSelfAttention2d", "MaskedLinear",
           "DownShiftedConv2d", "DownRightShiftedConv2d", "DownShiftedConvTranspose2d",
           "DownRightShiftedConvTranspose2d", "NIN", "GatedResnet", "concat_elu"]
