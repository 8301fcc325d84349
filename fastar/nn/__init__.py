"""Drop-in ``nn.Module`` layers built on fastar ops."""
from fastar.nn.masked_conv import MaskedConv2d

__all__ = ["MaskedConv2d"]
