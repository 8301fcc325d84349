"""NADE and RNADE (Larochelle & Murray 2011; Uria, Murray & Larochelle 2013): one shared hidden layer
whose pre-activation is a running sum over the values drawn so far, so all D conditionals cost O(DH).

``NADE(in_features, hidden, shape=None)`` over binary vectors (flattened in C order from one example
of ``shape``, default (D,); e.g. (1, 28, 28)), in the natural order d = 0 .. D - 1::

    a_0 = c,  a_{d+1} = a_d + W[d] x_d,  h_d = sigmoid(a_d),  p(x_d = 1 | x_<d) = sigmoid(b_d + V[d] . h_d)

``forward`` computes every a_d as exclusive cumulative sums (in blocks of 32 dimensions): O(DH) per example.
Sampling: the cache keeps a (N, H) and adds one row of W per drawn value: O(DH) per sample too.

``RNADE(in_features, hidden, components, shape=None)`` over real vectors: the same running sum, with
``h_d = sigmoid(rho_d a_d)`` (a learned per-dimension rescaling, as the paper) and a mixture of
``components`` Gaussians per dimension, ``params_d = V[d] h_d + b_d`` = (K logits, K means, K log
standard deviations), the protocol's :class:`~fastar.nn.heads.GaussianMixture` head; ``nll`` is minus
the log-density in nats (of the data in the units given). Its forward runs the running sum step by step,
the very operations the cache does, so cached == naive holds bit for bit in float64 for real values.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastar.models.flat import FlatModel, check_shape_arg
from fastar.models.spec import ModelSpec, register
from fastar.nn.heads import Bernoulli, GaussianMixture
from fastar.sampling.protocol import InferenceCache

__all__ = ["NADE", "RNADE"]

_BLOCK = 32


def _check_sizes(name, **sizes):
    for k, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: {k} must be a positive int, got {v!r}")


class NADE(FlatModel):
    """See the module docstring. Parameters: ``W`` (D, H) (row d: what value d adds to the hidden
    pre-activation), ``c`` (H,), ``V`` (D, H), ``b`` (D,)."""

    def __init__(self, in_features: int, hidden: int = 500, shape=None):
        super().__init__()
        _check_sizes("NADE", in_features=in_features, hidden=hidden)
        D, H = in_features, hidden
        self.in_features, self.hidden, self.levels = D, H, 2
        self.shape = check_shape_arg("NADE", D, shape)
        self.W = nn.Parameter(torch.randn(D, H) / math.sqrt(D))
        self.c = nn.Parameter(torch.zeros(H))
        self.V = nn.Parameter(torch.randn(D, H) / math.sqrt(H))
        self.b = nn.Parameter(torch.zeros(D))

    def logits_flat(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, D) from codes (N, D): the O(DH) running-sum forward."""
        xf = x.to(self.W.dtype)
        # Blocks of _BLOCK dimensions, each an exclusive cumulative sum (a_d sees x_<d) on the carry of
        # the blocks before: the same O(DH) work as one (N, D, H) cumsum, but cache-sized pieces
        # (measured about 2x faster for D = 784, H = 500, batch 100 on the 2-core CPU, forward + backward).
        carry = self.c.expand(x.shape[0], -1)
        outs = []
        for s in range(0, self.in_features, _BLOCK):
            e = min(self.in_features, s + _BLOCK)
            cs = torch.cumsum(xf[:, s:e, None] * self.W[s:e], 1)                 # (N, b, H)
            a = carry[:, None] + F.pad(cs[:, :-1], (0, 0, 1, 0))
            outs.append(torch.einsum("nbh,bh->nb", torch.sigmoid(a), self.V[s:e]))
            carry = carry + cs[:, -1]
        return torch.cat(outs, 1) + self.b

    def forward(self, x, cond=None):
        """Logits (N, D) of p(x_d = 1 | x_<d)."""
        self.no_cond("NADE", cond)
        return self.logits_flat(self.flat(x))

    def nll(self, x, cond=None):
        """Negative log-likelihood per example in nats, (N,)."""
        self.no_cond("NADE", cond)
        codes = self.flat(x)
        lg = self.logits_flat(codes)
        return F.binary_cross_entropy_with_logits(lg, codes.to(lg.dtype), reduction="none").sum(1)

    def sequence(self, n=None, shape=None, cond=None):
        from fastar.sampling import Sequence

        n, shape = self.sample_args(n, shape, cond)

        def forward(values, t=None):
            per = self.logits_flat(values).t()[:, :, None]                   # (T, N, 1)
            return per if t is None else per[t]

        return Sequence(n=n, steps=self.in_features, head=Bernoulli(), forward=forward, shape=shape)

    def allocate_inference_cache(self, run, fused=None):
        if fused:
            raise ValueError("fused=True: NADE has no fused step (its cached step is one running-sum update)")
        return _NadeSums(self, run)


class _NadeSums(InferenceCache):
    """a (N, H), the hidden pre-activation of the next step: step t reads it, update adds x_t W[t]."""

    capturable = False

    def __init__(self, model, run):
        super().__init__(run)
        dt = run.acc
        self.W, self.V, self.b = (p.detach().to(dt) for p in (model.W, model.V, model.b))
        self.a = model.c.detach().to(dt).expand(run.seq.n, -1).clone()

    def step(self, key, t):
        return (torch.sigmoid(self.a) @ self.V[t] + self.b[t]).unsqueeze(1)

    def update(self, key, t, values):
        self.a.add_(values.to(self.a.dtype) * self.W[t])


class RNADE(FlatModel):
    """See the module docstring. Parameters: ``W`` (D, H), ``c`` (H,), ``rho`` (D,), ``V`` (D, 3K, H),
    ``b`` (D, 3K)."""

    def __init__(self, in_features: int, hidden: int = 50, components: int = 5, shape=None):
        super().__init__()
        _check_sizes("RNADE", in_features=in_features, hidden=hidden, components=components)
        D, H, K = in_features, hidden, components
        self.in_features, self.hidden, self.components, self.levels = D, H, K, None
        self.shape = check_shape_arg("RNADE", D, shape)
        self.dist = GaussianMixture(K)
        self.W = nn.Parameter(torch.randn(D, H) / math.sqrt(D))
        self.c = nn.Parameter(torch.zeros(H))
        self.rho = nn.Parameter(torch.ones(D))
        self.V = nn.Parameter(torch.randn(D, 3 * K, H) * (0.1 / math.sqrt(H)))
        b = torch.zeros(D, 3 * K)
        b[:, K:2 * K] = torch.linspace(-1.5, 1.5, K) if K > 1 else 0.0   # spread the means over a standard scale
        self.b = nn.Parameter(b)

    def _out(self, a, d):
        """Step d's mixture parameters (N, 3K) from its hidden pre-activation a (N, H)."""
        return F.linear(torch.sigmoid(a * self.rho[d]), self.V[d], self.b[d])

    def params_flat(self, x: torch.Tensor) -> torch.Tensor:
        """Every step's parameters (N, 3K, D) from values (N, D): the running sum, step by step."""
        x = x.to(self.W.dtype)
        a = self.c.expand(x.shape[0], -1)
        out = []
        for d in range(self.in_features):
            out.append(self._out(a, d))
            a = a + x[:, d, None] * self.W[d]
        return torch.stack(out, 2)

    def forward(self, x, cond=None):
        """Mixture parameters (N, 3K, D): K logits, K means, K log standard deviations per dimension."""
        self.no_cond("RNADE", cond)
        return self.params_flat(self.flat(x))

    def nll(self, x, cond=None):
        """Minus the log-density per example in nats, (N,)."""
        self.no_cond("RNADE", cond)
        v = self.flat(x)
        return self.dist.nll(v.to(self.W.dtype), self.params_flat(v), reduction="none")

    def sequence(self, n=None, shape=None, cond=None):
        from fastar.sampling import Sequence

        n, shape = self.sample_args(n, shape, cond)

        def forward(values, t=None):
            per = self.params_flat(values).permute(2, 0, 1)                   # (T, N, 3K)
            return per if t is None else per[t]

        return Sequence(n=n, steps=self.in_features, head=self.dist, forward=forward, shape=shape)

    def allocate_inference_cache(self, run, fused=None):
        if fused:
            raise ValueError("fused=True: RNADE has no fused step (its cached step is one running-sum update)")
        return _RnadeSums(self, run)


class _RnadeSums(InferenceCache):
    """a (N, H): step t gives ``model._out(a, t)``, update adds x_t W[t] (the forward's own operations)."""

    capturable = False

    def __init__(self, model, run):
        super().__init__(run)
        self.model = model
        self.a = model.c.detach().to(run.acc).expand(run.seq.n, -1)

    def step(self, key, t):
        return self.model._out(self.a, t).to(self.run.acc)

    def update(self, key, t, values):
        self.a = self.a + values.to(self.a.dtype) * self.model.W[t]


def _nade_config(data: dict) -> dict:
    shape = tuple(data["shape"])
    return dict(in_features=math.prod(shape), hidden=500, shape=shape)


def _rnade_config(data: dict) -> dict:
    return dict(in_features=math.prod(data["shape"]), hidden=50, components=5)


register(ModelSpec(
    name="nade", cls=NADE, kind="image", datasets=("binarized_mnist", "mnist", "digits"), default_config=_nade_config,
    writer="png", demo=dict(data="binarized_mnist", batch_size=100, lr=1e-3),
    tiny=(dict(config=dict(in_features=9, hidden=3), shape=(9,)),
          dict(config=dict(in_features=6, hidden=5, shape=(1, 2, 3)), shape=(2, 3))),
    description="NADE: shared hidden weights, every conditional in O(DH) with a running sum"))
register(ModelSpec(
    name="rnade", cls=RNADE, kind="vector", datasets=("wine", "diabetes", "digits_real"), default_config=_rnade_config,
    writer="npy", demo=dict(data="wine", batch_size=32, lr=3e-3),
    tiny=(dict(config=dict(in_features=2, hidden=4, components=2), shape=(2,)),
          dict(config=dict(in_features=4, hidden=3, components=3, shape=(2, 2)), shape=(2, 2))),
    description="RNADE: NADE with a mixture of Gaussians per real-valued dimension"))
