"""Distribution heads of the generation engine: how one step's parameters become a value.

A head states how many parameters a step has (``params``), how many uniforms its draw consumes
(``uniforms``) and the dtype of the values; ``draw(params, u, temperature)`` is the engine's
draw, the inverse CDF on uniforms drawn up front, so that every sampler of a model (naive,
cached per-op, fused) consumes the same uniforms and draws the same values. A fused op that draws
inside its kernel must draw exactly what ``draw`` would (the contract suite checks it).
"""
from __future__ import annotations

import torch

from fastar.ops.mixture import categorical_sample, sample_discretized_mix_logistic

__all__ = ["Head", "Bernoulli", "Categorical", "LogisticMixture"]


class Head:
    params: int = 1
    uniforms: int = 1
    discrete: bool = True

    def value_dtype(self, acc: torch.dtype) -> torch.dtype:
        return torch.int64 if self.discrete else acc

    def draw(self, params: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
        """params (N, params), u (N, uniforms) -> values (N,)."""
        raise NotImplementedError

    def log_prob(self, params: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """log p(values | params), (N,) nats; the contract suite's normalisation check uses it."""
        raise NotImplementedError

    def support(self, dtype=torch.float64) -> torch.Tensor:
        """Every value a step can take (for exhaustive checks on tiny domains)."""
        raise NotImplementedError


class Bernoulli(Head):
    """One logit per step: P(1) = sigmoid(logit), drawn as the categories (0, logit)."""

    def draw(self, params, u, temperature):
        lg = params[:, 0]
        two = torch.stack([torch.zeros_like(lg), lg], 1)
        return categorical_sample(two, dim=1, noise=u[:, 0], temperature=temperature)

    def log_prob(self, params, values):
        return -torch.nn.functional.binary_cross_entropy_with_logits(params[:, 0], values.to(params.dtype),
                                                                     reduction="none")

    def support(self, dtype=torch.float64):
        return torch.arange(2)


class Categorical(Head):
    """``levels`` logits per step: softmax."""

    def __init__(self, levels: int):
        self.params = levels

    def draw(self, params, u, temperature):
        return categorical_sample(params, dim=1, noise=u[:, 0], temperature=temperature)

    def log_prob(self, params, values):
        return -torch.nn.functional.cross_entropy(params, values, reduction="none")

    def support(self, dtype=torch.float64):
        return torch.arange(self.params)


class LogisticMixture(Head):
    """A discretized logistic mixture over scalars in [-1, 1] (2**num_bits bins): 3K parameters
    (K logits, K means, K log-scales) and two uniforms per step (component, logistic draw)."""

    uniforms = 2
    discrete = False

    def __init__(self, num_mixtures: int, num_bits: int = 8):
        self.k, self.num_bits, self.params = num_mixtures, num_bits, 3 * num_mixtures

    def draw(self, params, u, temperature):
        return sample_discretized_mix_logistic(params.unsqueeze(2), self.k, noise=u.unsqueeze(2),
                                               temperature=temperature, num_bits=self.num_bits)[:, 0]

    def log_prob(self, params, values):
        from fastar.ops.mixture import discretized_mix_logistic_nll

        return -discretized_mix_logistic_nll(values.unsqueeze(1).to(params.dtype), params.unsqueeze(2), self.k,
                                             num_bits=self.num_bits, reduction="none").reshape(-1)

    def support(self, dtype=torch.float64):
        bins = 2 ** self.num_bits
        return torch.arange(bins, dtype=dtype) * (2.0 / (bins - 1)) - 1.0
