"""Data: mu-law companding, bundled real data sets (the :mod:`fastar.data.sets` table), image/audio writers."""
from fastar.data.audio import read_wav, write_wav
from fastar.data.digits import load_digits_8x8
from fastar.data.images import load_image, save_image_grid
from fastar.data.mnist import load_mnist_5k
from fastar.data.mulaw import mu_law_decode, mu_law_encode
from fastar.data.patches import load_patches
from fastar.data.sets import DATASETS, Dataset, load_dataset

__all__ = ["mu_law_encode", "mu_law_decode", "read_wav", "write_wav", "load_mnist_5k", "load_digits_8x8",
           "load_patches", "save_image_grid", "load_image", "Dataset", "DATASETS", "load_dataset"]
