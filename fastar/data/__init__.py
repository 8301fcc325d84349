"""Data: mu-law companding, bundled real data sets, image/audio writers."""
from fastar.data.audio import read_wav, write_wav
from fastar.data.mnist import load_mnist_5k
from fastar.data.mulaw import mu_law_decode, mu_law_encode

__all__ = ["mu_law_encode", "mu_law_decode", "read_wav", "write_wav", "load_mnist_5k"]
