"""Generation engines: naive (the whole network per sub-pixel) and cached (2-D caches, one position per step)."""
from fastar.sampling.engine import SamplePlan, cached_sample, naive_sample, prepare, sample

__all__ = ["sample", "naive_sample", "cached_sample", "prepare", "SamplePlan"]
