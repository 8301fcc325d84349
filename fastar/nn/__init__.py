"""Drop-in ``nn.Module`` layers built on fastar ops."""
from fastar.nn.masked_conv import MaskedConv2d
from fastar.nn.causal_conv import CausalConv1d

__all__ = ["MaskedConv2d", "CausalConv1d"]
from fastar.nn.gated import GatedMaskedConv2d  # noqa: E402

__all__ += ["GatedMaskedConv2d"]
