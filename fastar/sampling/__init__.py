"""The one generation engine (see :mod:`fastar.sampling.engine` and ``docs/architecture.md``)."""
from fastar.sampling.engine import GraphRunner, cached_sample, drive, naive_sample, prepare, progress_bar, sample
from fastar.sampling.heads import Bernoulli, Categorical, DiscretizedMixLogistic, GaussianMixture, Head, LogisticMixture
from fastar.sampling.protocol import ForwardCache, GenerationRun, InferenceCache, Sequence

__all__ = ["sample", "prepare", "cached_sample", "naive_sample", "drive", "GraphRunner", "progress_bar", "Sequence",
           "GenerationRun", "InferenceCache", "ForwardCache", "Head", "Bernoulli", "Categorical",
           "LogisticMixture", "DiscretizedMixLogistic", "GaussianMixture"]
