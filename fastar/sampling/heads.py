"""The generation engine's view of the distribution heads: the one hierarchy lives in
:mod:`fastar.nn.heads` (training losses and the engine use the same classes); re-exported here."""
from fastar.nn.heads import (Bernoulli, Categorical, DiscretizedMixLogistic, GaussianMixture, Head,  # noqa: F401
                             LogisticMixture)

__all__ = ["Head", "Bernoulli", "Categorical", "DiscretizedMixLogistic", "LogisticMixture", "GaussianMixture"]
