"""Data: mu-law companding, bundled real data sets, image/audio writers."""
from fastar.data.mulaw import mu_law_decode, mu_law_encode

__all__ = ["mu_law_encode", "mu_law_decode"]
