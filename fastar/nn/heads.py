"""Distribution heads: the one hierarchy that both training losses and the generation engine use.

A head holds no parameters. It says what one *step* of a model looks like: how many distribution
parameters it has (``params``, P), how many values it draws jointly (``values``, V: 1 for a
sub-pixel or an audio sample, 3 for a PixelCNN++ pixel whose R, G and B come from one mixture
component) and how many uniforms its draw consumes (``uniforms``, U). Per step:

* ``draw(params (N, P), u (N, U), temperature) -> (N, V)``: the inverse CDF on uniforms drawn up
  front by the engine, so that every sampler of a model (naive, cached per-op, a fused kernel)
  consumes the same uniforms and draws the same values;
* ``log_prob(params (N, P), values (N, V)) -> (N,)`` nats;
* ``support() -> (K, V)`` every value a discrete step can take (exhaustive checks on tiny
  domains); continuous heads offer ``quadrature(params, m)`` instead, a grid that integrates
  their density (the contract suite checks each conditional integrates to one);
* ``check_values(x, what)``: given values (a prefix, a prime) outside the support are a clear error;
* ``support_log_probs(params (N, P)) -> (N, K)``: the log-probability of every support value at once
  (the codec's per-step distributions; a generic default over ``log_prob``, closed forms for
  :class:`Bernoulli` and :class:`Categorical`);
* ``value_support(j)`` / ``value_log_probs(params (N, P), j, prev (N, j)) -> (N, L)``: the chain-rule
  factors of a step that draws V > 1 values jointly, value j's alphabet and its log-probabilities given
  the step's earlier values (:class:`DiscretizedMixLogistic`: R, then G given R, then B given R and G),
  so the codec codes V symbols of L values instead of one of L**V.

Over whole tensors (training): ``nll(x, params, reduction)`` with the layouts each class documents
(images (B, P_total, H, W), audio (B, P, T), tables (B, P, D)), and ``sample(params, ...)``.

Classes: :class:`Bernoulli` (binary, one logit), :class:`Categorical` (softmax over ``levels``;
:class:`Categorical256` is its drop-in name for 256-level models), :class:`DiscretizedMixLogistic`
(PixelCNN++'s mixture: channels 1 or 3 drawn jointly; :class:`LogisticMixture` is the scalar form),
:class:`GaussianMixture` (real values: RNADE-style densities).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastar.ops.mixture import (categorical_sample, discretized_mix_logistic_nll, dml_value_log_probs,
                                sample_discretized_mix_logistic)

__all__ = ["Head", "Bernoulli", "Categorical", "Categorical256", "DiscretizedMixLogistic", "LogisticMixture",
           "GaussianMixture"]

_REDUCTIONS = ("none", "sum", "mean")


def _reduce(name, per_item, reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}.nll: reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    if reduction == "none":
        return per_item
    return per_item.sum() if reduction == "sum" else per_item.mean()


def _pos_int(name, what, v, lo=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: {what} must be an int >= {lo}, got {v!r}")
    return v


class Head(nn.Module):
    """Base of every head (see the module docstring). Subclasses set ``params``, ``values``,
    ``uniforms`` and ``discrete`` and implement ``draw`` and ``log_prob`` (and ``support`` when
    discrete, ``quadrature`` when continuous)."""

    params: int = 1
    values: int = 1
    uniforms: int = 1
    discrete: bool = True

    def value_dtype(self, acc: torch.dtype) -> torch.dtype:
        """dtype of the values a step draws: int64 codes for discrete heads, else the accumulation dtype."""
        return torch.int64 if self.discrete else acc

    def draw(self, params: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, params: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def support(self, dtype=torch.float64) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is continuous: it has no finite support (see quadrature)")

    def support_log_probs(self, params: torch.Tensor) -> torch.Tensor:
        """(N, K) log-probabilities (nats) of every value of ``support()`` (row k = support row k) under
        each of the N steps' parameters: a discrete step's whole distribution at once (what an entropy
        coder needs). This default evaluates ``log_prob`` on every (step, support value) pair; a head
        with a closed form overrides it. Continuous heads have no finite support: NotImplementedError."""
        sup = self.support(params.dtype).to(params.device)                         # (K, V)
        n, k = params.shape[0], sup.shape[0]
        vals = sup.to(self.value_dtype(params.dtype)).unsqueeze(0).expand(n, k, sup.shape[1]).reshape(n * k, -1)
        return self.log_prob(params.repeat_interleave(k, 0), vals).view(n, k)

    def value_support(self, j: int, dtype=torch.float64) -> torch.Tensor:
        """(L,) every value that value j of a step can take, increasing: the alphabet of
        :meth:`value_log_probs`. Default (one value a step): ``support()``'s column."""
        if self.values != 1 or j != 0:
            raise NotImplementedError(f"{type(self).__name__} draws its {self.values} values jointly and gives no "
                                      "per-value alphabet")
        return self.support(dtype)[:, 0]

    def value_log_probs(self, params: torch.Tensor, j: int, prev: torch.Tensor) -> torch.Tensor:
        """(N, L) log-probabilities (nats) of every value of ``value_support(j)`` for value j of each of
        the N steps, given the step's earlier values ``prev`` (N, j): the chain-rule factors of a joint
        step, so a coder can code V values of L each instead of L**V joint values. Summed over j at a
        step's values they give ``log_prob``. Default (one value a step): ``support_log_probs``; a head
        whose values are drawn jointly overrides it (:class:`DiscretizedMixLogistic`) or has none
        (NotImplementedError)."""
        if self.values != 1 or j != 0:
            raise NotImplementedError(f"{type(self).__name__} draws its {self.values} values jointly and gives no "
                                      "per-value conditionals")
        return self.support_log_probs(params)

    def quadrature(self, params: torch.Tensor, m: int = 2001):
        raise NotImplementedError(f"{type(self).__name__} is discrete: enumerate support() instead")

    def check_values(self, x: torch.Tensor, what: str = "values") -> torch.Tensor:
        """x (any shape) of values a step can take, in the head's value dtype; ValueError otherwise."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{what} must be a tensor, got {type(x).__name__}")
        if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{what} must be finite, got NaN or inf")
        return x


class _DiscreteCodes(Head):
    """Integer codes in [0, K)."""

    def _k(self) -> int:
        raise NotImplementedError

    def support(self, dtype=torch.float64):
        return torch.arange(self._k()).unsqueeze(1)

    def check_values(self, x, what="values"):
        x = super().check_values(x, what)
        if x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"{what} must hold integer codes in [0, {self._k()}), got {x.dtype}")
        if x.is_floating_point() and not torch.equal(x, x.round()):
            raise ValueError(f"{what} must hold integer codes in [0, {self._k()}), got non-integer values")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self._k()):
            raise ValueError(f"{what} values must lie in [0, {self._k()}), got range [{int(x.min())}, {int(x.max())}]")
        return x.to(torch.int64)


class Bernoulli(_DiscreteCodes):
    """Binary values: one logit per step, P(1) = sigmoid(logit), drawn as the categories (0, logit).

    ``Bernoulli(channels=1)``; over whole tensors the model outputs logits of the data's shape.
    """

    def __init__(self, channels: int = 1):
        super().__init__()
        self.channels = _pos_int("Bernoulli", "channels", channels)
        self.params = 1

    def _k(self):
        return 2

    @property
    def param_channels(self) -> int:
        return self.channels

    def draw(self, params, u, temperature):
        lg = params[:, 0]
        two = torch.stack([torch.zeros_like(lg), lg], 1)
        return categorical_sample(two, dim=1, noise=u[:, 0], temperature=temperature).unsqueeze(1)

    def log_prob(self, params, values):
        return -F.binary_cross_entropy_with_logits(params[:, 0], values[:, 0].to(params.dtype), reduction="none")

    def support_log_probs(self, params):
        lg = params[:, 0]
        return torch.stack([F.logsigmoid(-lg), F.logsigmoid(lg)], 1)

    def nll(self, x, logits, reduction="sum"):
        """x of the logits' shape (B, ...) in {0, 1}; nats summed per item."""
        per = F.binary_cross_entropy_with_logits(logits, x.to(logits.dtype), reduction="none")
        return _reduce("Bernoulli", per.flatten(1).sum(1), reduction)

    def extra_repr(self):
        return f"channels={self.channels}"


class Categorical(_DiscreteCodes):
    """Softmax over ``levels`` per sub-pixel (PixelCNN, PixelRNN) or audio sample (WaveNet).

    ``Categorical(levels, channels=1)``; per step: ``levels`` logits. Over whole tensors the model
    outputs logits (B, channels * levels, *S), colour-major (channel ``c * levels + v`` is level v of
    colour c, so RGB channel groups stay blocked), where S is (H, W) for images or (T,) for audio.

    * ``nll(x, logits, reduction="sum")``: x int64 codes in [0, levels) of shape (B, channels, *S)
      (or (B, *S) when channels=1); cross-entropy in nats summed per item: (B,) for "none", else
      their sum / batch mean. Equals ``F.cross_entropy(logits.view(B, C, V, *S).movedim(2, 1), x,
      reduction="none").flatten(1).sum(1)``.
    * ``sample(logits, generator=None, noise=None, temperature=1.0, top_k=None)``: int64 codes
      (B, channels, *S), or (B, T) for 3-D audio logits with channels=1, via
      :func:`fastar.ops.categorical_sample` (noise: uniforms of the codes' shape).
    """

    _name = "Categorical"
    _levels_name = "levels"

    def __init__(self, levels: int = 256, channels: int = 1):
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"{self._name}: channels must be a positive int, got {channels!r}")
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 2:
            raise ValueError(f"{self._name}: {self._levels_name} must be an int >= 2, got {levels!r}")
        self.levels, self.channels = levels, channels
        self.params = levels

    @property
    def num_classes(self) -> int:
        return self.levels

    def _k(self):
        return self.levels

    @property
    def param_channels(self) -> int:
        return self.channels * self.levels

    def draw(self, params, u, temperature):
        return categorical_sample(params, dim=1, noise=u[:, 0], temperature=temperature).unsqueeze(1)

    def log_prob(self, params, values):
        return -F.cross_entropy(params, values[:, 0], reduction="none")

    def support_log_probs(self, params):
        return torch.log_softmax(params, 1)

    def _split(self, name: str, logits: torch.Tensor) -> torch.Tensor:
        """(B, C * V, *S) -> (B, C, V, *S)."""
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise TypeError(f"{self._name}.{name}: logits must be a floating-point tensor")
        if logits.dim() < 2 or logits.shape[1] != self.param_channels:
            raise ValueError(f"{self._name}.{name}: logits must be (B, {self.param_channels}, ...) "
                             f"({self.channels} x {self.levels}), got shape {list(logits.shape)}")
        return logits.view(logits.shape[0], self.channels, self.levels, *logits.shape[2:])

    def nll(self, x: torch.Tensor, logits: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{self._name}.nll: reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
        lg = self._split("nll", logits)
        target_shape = (lg.shape[0], self.channels) + tuple(lg.shape[3:])
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
            raise TypeError(f"{self._name}.nll: x must be an int64 tensor of codes, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if self.channels == 1 and tuple(x.shape) == (target_shape[0],) + target_shape[2:]:
            x = x.unsqueeze(1)
        if tuple(x.shape) != target_shape:
            raise ValueError(f"{self._name}.nll: x must have shape {list(target_shape)} to match logits of shape "
                             f"{list(logits.shape)}, got {list(x.shape)}")
        ce = F.cross_entropy(lg.movedim(2, 1), x, reduction="none")
        return _reduce(self._name, ce.flatten(1).sum(1), reduction)

    def forward(self, x: torch.Tensor, logits: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return self.nll(x, logits, reduction)

    def sample(self, logits: torch.Tensor, generator=None, noise=None, temperature: float = 1.0,
               top_k=None) -> torch.Tensor:
        lg = self._split("sample", logits)
        if noise is not None and self.channels == 1 and noise.dim() == lg.dim() - 2:
            noise = noise.unsqueeze(1)
        out = categorical_sample(lg, dim=2, generator=generator, noise=noise, temperature=temperature, top_k=top_k)
        return out.squeeze(1) if self.channels == 1 and logits.dim() == 3 else out

    def extra_repr(self) -> str:
        return f"levels={self.levels}, channels={self.channels}"


class Categorical256(Categorical):
    """:class:`Categorical` with the argument order of 256-level models: ``Categorical256(channels=1,
    num_classes=256)``."""

    _name = "Categorical256"
    _levels_name = "num_classes"

    def __init__(self, channels: int = 1, num_classes: int = 256):
        super().__init__(num_classes, channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_classes={self.levels}"


class DiscretizedMixLogistic(Head):
    """PixelCNN++'s discretized logistic mixture (openai/pixel-cnn parameter layout).

    ``DiscretizedMixLogistic(num_mixtures, channels=3, num_bits=8)``. One step is one pixel: its
    ``channels`` values (R, G, B) are drawn jointly from one shared mixture component with the
    channel coefficients (G depends on R, B on R and G), from 1 + channels uniforms (component, one
    logistic draw per channel). Per step: P = 3K parameters for 1 channel, 10K for 3 (K logits,
    then means, log-scales and coefficients, each K per channel); values in [-1, 1] at the centres
    of 2**num_bits bins.

    Over whole tensors the model outputs params of shape (B, param_channels, H, W) for images
    ((B, param_channels, T) for audio, channels=1):

    * ``nll(x, params, reduction="sum")``: x (B, C, H, W) or (B, T) in [-1, 1]; NLL in nats,
      (B,) for "none". Same as :func:`fastar.ops.discretized_mix_logistic_nll`.
    * ``sample(params, generator=None, noise=None, temperature=1.0)``: (B, C, H, W) / (B, T)
      at the bin centres. Same as :func:`fastar.ops.sample_discretized_mix_logistic`.
    * ``forward(x, params)`` is ``nll``.

    Devices and dtypes: those of the ops (kernels on CPU float32/64 and CUDA float32/64/16/bf16).
    """

    discrete = False

    def __init__(self, num_mixtures: int, channels: int = 3, num_bits: int = 8):
        super().__init__()
        name = type(self).__name__
        if not isinstance(num_mixtures, int) or isinstance(num_mixtures, bool) or num_mixtures < 1:
            raise ValueError(f"{name}: num_mixtures must be a positive int, got {num_mixtures!r}")
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ValueError(f"{name}: channels must be 1 or 3, got {channels!r}")
        if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 1 <= num_bits <= 16:
            raise ValueError(f"{name}: num_bits must be an int in [1, 16], got {num_bits!r}")
        self.num_mixtures, self.channels, self.num_bits = num_mixtures, channels, num_bits
        self.k = num_mixtures
        self.params = self.param_channels
        self.values = channels
        self.uniforms = 1 + channels

    @property
    def param_channels(self) -> int:
        """Parameters per pixel: 3K for 1 channel, 10K for 3."""
        return (3 if self.channels == 1 else 10) * self.num_mixtures

    # ---- per step
    def draw(self, params, u, temperature):
        # One channel: the (B, 3K, T) audio layout with T = 1; three: a 1 x 1 image.
        if self.channels == 1:
            p, noise = params.unsqueeze(2), u.unsqueeze(2)
        else:
            p, noise = params[:, :, None, None], u[:, :, None, None]
        out = sample_discretized_mix_logistic(p, self.k, noise=noise, temperature=temperature, num_bits=self.num_bits)
        return out.reshape(params.shape[0], self.channels)

    def log_prob(self, params, values):
        x = values.to(params.dtype)
        if self.channels == 1:
            x, p = x, params.unsqueeze(2)                                                # (N, 1), (N, 3K, 1)
        else:
            x, p = x[:, :, None, None], params[:, :, None, None]                         # (N, 3, 1, 1)
        return -discretized_mix_logistic_nll(x, p, self.k, num_bits=self.num_bits, reduction="none").reshape(-1)

    def support(self, dtype=torch.float64):
        bins = 2 ** self.num_bits - 1
        # (2 i - bins) / bins: one rounding of exact integers, the bits the sampler's centres have
        centres = (torch.arange(bins + 1, dtype=dtype) * 2.0 - bins) / bins
        if self.channels == 1:
            return centres.unsqueeze(1)
        return torch.tensor(list(itertools.product(centres.tolist(), repeat=self.channels)), dtype=dtype)

    def value_support(self, j, dtype=torch.float64):
        """The 2**num_bits bin centres of colour j (every colour has the same ones)."""
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < self.channels:
            raise ValueError(f"{type(self).__name__}.value_support: j must be a colour index in [0, {self.channels}), "
                             f"got {j!r}")
        bins = 2 ** self.num_bits - 1
        return (torch.arange(bins + 1, dtype=dtype) * 2.0 - bins) / bins

    def value_log_probs(self, params, j, prev):
        """Colour j's bins given the pixel's earlier colours (R, then G given R, then B given R and G): the
        mixture weights are their posterior given those colours (:func:`fastar.ops.dml_value_log_probs`, in
        the params' accumulation dtype)."""
        name = type(self).__name__
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < self.channels:
            raise ValueError(f"{name}.value_log_probs: j must be a colour index in [0, {self.channels}), got {j!r}")
        if params.dim() != 2 or params.shape[1] != self.params:
            raise ValueError(f"{name}.value_log_probs: params must be (N, {self.params}), got {list(params.shape)}")
        if prev.dim() != 2 or tuple(prev.shape) != (params.shape[0], j):
            raise ValueError(f"{name}.value_log_probs: prev must be (N, j) = {[params.shape[0], j]} (the step's "
                             f"earlier colours), got {list(prev.shape)}")
        acc = torch.float64 if params.dtype == torch.float64 else torch.float32
        return dml_value_log_probs(params, prev.to(acc), self.k, j, self.num_bits)

    def check_values(self, x, what="values"):
        x = super().check_values(x, what)
        if not x.is_floating_point():
            raise ValueError(f"{what} must be floats in [-1, 1] (a discretized mixture's bin centres), got {x.dtype}")
        if x.numel() and (float(x.min()) < -1.0 or float(x.max()) > 1.0):
            raise ValueError(f"{what} values must lie in [-1, 1], got range [{float(x.min())}, {float(x.max())}]")
        return x

    # ---- whole tensors
    def nll(self, x: torch.Tensor, params: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return discretized_mix_logistic_nll(x, params, self.num_mixtures, self.num_bits, reduction)

    def forward(self, x: torch.Tensor, params: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return self.nll(x, params, reduction)

    def sample(self, params: torch.Tensor, generator=None, noise=None, temperature: float = 1.0) -> torch.Tensor:
        return sample_discretized_mix_logistic(params, self.num_mixtures, generator, noise, temperature,
                                               self.num_bits)

    def extra_repr(self) -> str:
        return f"num_mixtures={self.num_mixtures}, channels={self.channels}, num_bits={self.num_bits}"


class LogisticMixture(DiscretizedMixLogistic):
    """The scalar discretized logistic mixture (WaveNet's mixture head, a grey image):
    ``LogisticMixture(num_mixtures, num_bits=8, channels=1)``; see :class:`DiscretizedMixLogistic`."""

    def __init__(self, num_mixtures: int, num_bits: int = 8, channels: int = 1):
        super().__init__(num_mixtures, channels, num_bits)


_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_U_EPS = 1e-12


class GaussianMixture(Head):
    """A mixture of K Gaussians over one real value per step (RNADE's conditionals).

    ``GaussianMixture(num_mixtures)``. Per step: P = 3K parameters (K logits, K means, K log standard
    deviations), one value, two uniforms (the component by the one categorical pick, then the
    value by the normal inverse CDF ``mean + sigma * sqrt(2) * erfinv(2u - 1)``). temperature scales
    the logits' softmax (as every categorical pick does) and sigma; 0 gives the mean of the most
    likely component. log_prob is the density in nats (a real-valued head: nats of density, not of
    probability).

    Over whole tensors the model outputs params (B, 3K, *S) for values x (B, *S): ``nll(x, params)``
    is minus the log-density summed per item.
    """

    discrete = False

    def __init__(self, num_mixtures: int):
        super().__init__()
        self.num_mixtures = self.k = _pos_int("GaussianMixture", "num_mixtures", num_mixtures)
        self.params = 3 * num_mixtures
        self.values = 1
        self.uniforms = 2

    @property
    def param_channels(self) -> int:
        return 3 * self.num_mixtures

    def _split(self, params):
        k = self.k
        return params[:, :k], params[:, k:2 * k], params[:, 2 * k:3 * k]

    def draw(self, params, u, temperature):
        logits, means, log_sd = self._split(params)
        comp = categorical_sample(logits, dim=1, noise=u[:, 0], temperature=temperature)     # (N,)
        mean = means.gather(1, comp.unsqueeze(1)).squeeze(1)
        sd = torch.exp(log_sd.gather(1, comp.unsqueeze(1)).squeeze(1)) * temperature
        v = u[:, 1].to(params.dtype).clamp(_U_EPS, 1.0 - _U_EPS)
        return (mean + sd * (math.sqrt(2.0) * torch.erfinv(2.0 * v - 1.0))).unsqueeze(1)

    def _log_density(self, logits, means, log_sd, x):
        z = (x - means) * torch.exp(-log_sd)
        comp = -0.5 * z * z - log_sd - _LOG_SQRT_2PI
        return torch.logsumexp(torch.log_softmax(logits, 1) + comp, 1)

    def log_prob(self, params, values):
        logits, means, log_sd = self._split(params)
        return self._log_density(logits, means, log_sd, values[:, :1].to(params.dtype))

    def quadrature(self, params, m=4001):
        """Points (N, m, 1) and log trapezoid weights (N, m) covering every component to 12 sigma."""
        _, means, log_sd = self._split(params)
        sd = torch.exp(log_sd)
        lo = (means - 12 * sd).min(1).values
        hi = (means + 12 * sd).max(1).values
        r = torch.linspace(0.0, 1.0, m, dtype=params.dtype, device=params.device)
        pts = lo[:, None] + (hi - lo)[:, None] * r[None, :]
        w = ((hi - lo) / (m - 1))[:, None].expand(-1, m).clone()
        w[:, 0] *= 0.5
        w[:, -1] *= 0.5
        return pts.unsqueeze(2), torch.log(w)

    def nll(self, x, params, reduction="sum"):
        """x (B, *S) real values, params (B, 3K, *S): minus the log-density in nats summed per item."""
        if params.dim() < 2 or params.shape[1] != self.params or tuple(x.shape) != (params.shape[0],) + tuple(
                params.shape[2:]):
            raise ValueError(f"GaussianMixture.nll: params must be (B, {self.params}, *S) and x (B, *S), got "
                             f"{list(params.shape)} and {list(x.shape)}")
        k = self.k
        lg, mu, ls = params[:, :k], params[:, k:2 * k], params[:, 2 * k:]
        per = -self._log_density(lg, mu, ls, x.unsqueeze(1).to(params.dtype))             # (B, *S)
        return _reduce("GaussianMixture", per.flatten(1).sum(1) if per.dim() > 1 else per, reduction)

    def extra_repr(self) -> str:
        return f"num_mixtures={self.num_mixtures}"
