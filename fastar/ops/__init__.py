"""fastar ops: each public function runs a compiled kernel or its pure-PyTorch ``*_ref`` twin."""
from fastar.ops.masked_conv import masked_conv2d, masked_conv2d_ref
from fastar.ops.mixture import categorical_sample, categorical_sample_ref

__all__ = ["masked_conv2d", "masked_conv2d_ref", "categorical_sample", "categorical_sample_ref"]
