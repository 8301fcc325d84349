"""MADE, the masked autoencoder for distribution estimation (Germain et al. 2015), sampled in one pass.

``MADE(in_features, hidden_sizes, levels=2, num_masks=1, natural_ordering=False, connectivity="fixed",
direct=False, seed=0, shape=None, order=None)``: D = in_features discrete values (binary, or ``levels`` codes),
flattened in C order from one example of ``shape`` (default (D,); e.g. (1, 28, 28) for MNIST).

Masks by the degree rule. A mask set k has an ordering ``orders[k]`` (the natural dimension drawn at
each step; input ``order[s]`` has degree s + 1) and hidden degrees m(u) in [1, D - 1] per layer: a unit
of degree m sees the units below of degree <= m (the inputs at steps < m); the output of dimension d
(degree deg_d) sees last-layer units with m < deg_d, and, with ``direct=True``, the inputs of lower
degree. ``num_masks`` mask sets are drawn from ``seed``: ``natural_ordering=True`` keeps the identity
ordering in every set (else each set draws a random ordering); ``connectivity="fixed"`` gives every set
the same hidden degrees (unit u of a layer of H units has degree 1 + floor(u (D - 1) / H), spread evenly
over [1, D - 1], so with layers at least D - 1 wide every output sees every earlier input); ``"agnostic"`` draws new degrees per set (layer l's
from [min of layer l - 1's, D - 1], as the paper).

Training: in train mode each ``nll`` call (one minibatch) first moves to the next mask set
(:meth:`update_masks`): order-agnostic and/or connectivity-agnostic training. Evaluation: ``nll`` in
eval mode is the ensemble's, ``-log (1/K sum_k p_k(x))`` (log-mean-exp of the likelihoods, not an
average of logits); :meth:`single_mask` restricts nll and sampling to one set.

Outputs (``forward``): logits (N, D) for levels == 2 (Bernoulli), (N, D, levels) otherwise (softmax
per dimension); the output layer's unit ``d * P + v`` is level v of dimension d (P = 1 or levels). The
network input is ``x / (levels - 1)``, one unit per dimension.

Sampling (the generation protocol): D steps in the mask's ordering, each value written at its natural
place (a sample is returned in the natural layout, whatever the ordering). An ensemble whose sets share
one ordering samples its exact mixture step by step (component k weighted by its likelihood of the
values drawn so far); an ensemble over several orderings has no step-by-step conditionals (the mixture
over orderings would need marginals), so sampling it is refused: draw from one set with
``single_mask(k)``. The cached sampler is the degree-bucket one-pass sampler of
:mod:`fastar.ops.made` (each hidden unit computed once; fused: C++ / CUDA kernel with the draws inside;
per-op: the same buckets, the engine draws); ``naive`` is D full forward passes.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fastar import _backend
from fastar.models.flat import FlatModel, check_shape_arg
from fastar.models.spec import ModelSpec, register
from fastar.nn.heads import Bernoulli, Categorical
from fastar.nn.masked_linear import MaskedLinear
from fastar.ops import made as _made
from fastar.sampling.protocol import InferenceCache

__all__ = ["MADE"]


class MADE(FlatModel):
    """See the module docstring. Parameters: ``layers`` (MaskedLinear per hidden layer), ``out``
    (MaskedLinear to D * P), ``direct`` (MaskedLinear D -> D * P without bias, or None). Buffers:
    ``orders`` (K, D), ``degrees_{l}`` (K, H_l), ``mask_index`` (the current set)."""

    def __init__(self, in_features: int, hidden_sizes=(500,), levels: int = 2, num_masks: int = 1,
                 natural_ordering: bool = False, connectivity: str = "fixed", direct: bool = False, seed: int = 0,
                 shape=None, order=None):
        super().__init__()
        name = "MADE"
        for k, v in (("in_features", in_features), ("num_masks", num_masks)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {k} must be a positive int, got {v!r}")
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"{name}: levels must be an int >= 2 (2 = binary), got {levels!r}")
        if isinstance(hidden_sizes, int) and not isinstance(hidden_sizes, bool):
            hidden_sizes = [hidden_sizes]                                   # one hidden layer
        if isinstance(hidden_sizes, int) or not isinstance(hidden_sizes, (tuple, list)) or not hidden_sizes or not all(
                isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden_sizes):
            raise ValueError(f"{name}: hidden_sizes must be a non-empty list of positive ints (one per hidden layer; "
                             f"a model without hidden layers is FVSBN), got {hidden_sizes!r}")
        if connectivity not in ("fixed", "agnostic"):
            raise ValueError(f"{name}: connectivity must be 'fixed' or 'agnostic', got {connectivity!r}")
        if not isinstance(natural_ordering, bool) or not isinstance(direct, bool):
            raise ValueError(f"{name}: natural_ordering and direct must be bools")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{name}: seed must be an int, got {seed!r}")
        D = in_features
        self.in_features, self.levels, self.hidden_sizes = D, levels, tuple(hidden_sizes)
        self.shape = check_shape_arg(name, D, shape)
        self.num_masks, self.natural_ordering, self.connectivity, self.seed = num_masks, natural_ordering, connectivity, seed
        narrow = [h for h in hidden_sizes if h < D - 1]
        if narrow:
            warnings.warn(f"MADE: hidden layers of {narrow} units are narrower than D - 1 = {D - 1}: not every "
                          "hidden degree can occur, so some outputs cannot see every earlier input (legal, but "
                          "lossy)", stacklevel=2)
        self.P = 1 if levels == 2 else levels
        sizes = [D, *hidden_sizes]
        self.layers = nn.ModuleList(MaskedLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = MaskedLinear(sizes[-1], D * self.P)
        self.direct = MaskedLinear(D, D * self.P, bias=False) if direct else None
        g = torch.Generator().manual_seed(seed)
        if order is not None:
            o = torch.as_tensor(order)
            if o.dim() != 1 or o.numel() != D or o.dtype.is_floating_point or o.dtype == torch.bool or not torch.equal(
                    o.to(torch.int64).sort().values, torch.arange(D)):
                raise ValueError(f"{name}: order must be a permutation of 0 .. {D - 1} (the dimension drawn at each "
                                 f"step), got {order!r}")
            orders = o.to("cpu", torch.int64).expand(num_masks, D).clone()
        else:   # the mask sets are drawn on the CPU from their own generator (also for a model built on meta)
            orders = torch.stack([torch.arange(D, device="cpu") if natural_ordering
                                  else torch.randperm(D, generator=g, device="cpu") for _ in range(num_masks)])
        self.register_buffer("orders", orders)
        top = max(D - 1, 1)
        for l, h in enumerate(hidden_sizes):
            if connectivity == "fixed":
                deg = (1 + torch.arange(h, device="cpu") * top // h).clamp(max=top).expand(num_masks, h).clone()
            else:
                lo = (torch.ones(num_masks, dtype=torch.int64, device="cpu") if l == 0
                      else getattr(self, f"degrees_{l - 1}").min(1).values)
                deg = torch.stack([torch.randint(int(lo[k]), top + 1, (h,), generator=g, device="cpu")
                                   for k in range(num_masks)])
            self.register_buffer(f"degrees_{l}", deg)
        self.register_buffer("mask_index", torch.zeros((), dtype=torch.int64, device="cpu"))
        self._single = None
        self._applied = None
        if self.out.weight.device.type != "meta":     # a meta build (a size check) has no values to mask
            self._apply_masks(0)

    # ---- masks -----------------------------------------------------------------------------

    def degrees(self, k: int):
        """(input degrees (D,) natural layout, [hidden degrees (H_l,) per layer]) of mask set k."""
        order = self.orders[k]
        deg_in = torch.empty_like(order)
        deg_in[order] = torch.arange(1, self.in_features + 1, device=order.device)
        return deg_in, [getattr(self, f"degrees_{l}")[k] for l in range(len(self.layers))]

    def masks(self, k: int):
        """The 0/1 masks of set k: one per hidden layer, the output's, and the direct layer's (or None)."""
        deg_in, hid = self.degrees(k)
        out_deg = deg_in.repeat_interleave(self.P)                            # output unit d * P + v
        ms, prev = [], deg_in
        for h in hid:
            ms.append((h[:, None] >= prev[None, :]))
            prev = h
        out = out_deg[:, None] > prev[None, :]
        direct = (out_deg[:, None] > deg_in[None, :]) if self.direct is not None else None
        return ms, out, direct

    def _apply_masks(self, k: int):
        ms, out, direct = self.masks(k)
        for layer, m in zip(self.layers, ms):
            layer.set_mask(m)
        self.out.set_mask(out)
        if self.direct is not None:
            self.direct.set_mask(direct)
        self._applied = k

    def _use(self, k: int):
        if self._applied != k or self.layers[0].mask.device != self.orders.device:
            self._apply_masks(k)

    def update_masks(self):
        """Move to the next of the ``num_masks`` mask sets (cycling); a no-op for one set."""
        self.mask_index.fill_((int(self.mask_index) + 1) % self.num_masks)
        self._apply_masks(int(self.mask_index))

    @contextlib.contextmanager
    def single_mask(self, k: int | None = None):
        """Within the block, nll and sampling use mask set k alone (default: the current one)."""
        k = int(self.mask_index) if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_masks:
            raise ValueError(f"MADE.single_mask: k must be an int in [0, {self.num_masks}), got {k!r}")
        prev, self._single = self._single, k
        try:
            yield self
        finally:
            self._single = prev

    def components(self) -> list:
        """The mask sets nll and sampling use now: the single one, the current one in train mode, else all."""
        if self._single is not None:
            return [self._single]
        if self.training:
            return [int(self.mask_index)]
        return list(range(self.num_masks))

    # ---- likelihood --------------------------------------------------------------------------

    def _inputs(self, codes):
        dtype = self.out.weight.dtype
        return codes.to(dtype) / (self.levels - 1)

    def logits_of(self, codes: torch.Tensor, k: int) -> torch.Tensor:
        """Mask set k's output logits (N, D, P) for codes (N, D) (natural layout)."""
        return self.net(self._inputs(codes), k)

    def net(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Mask set k's network on real inputs x (N, D) (the codes / (levels - 1)): logits (N, D, P)."""
        self._use(k)
        h = x
        for layer in self.layers:
            h = torch.relu(layer(h))
        out = self.out(h)
        if self.direct is not None:
            out = out + self.direct(x)
        return out.view(x.shape[0], self.in_features, self.P)

    def _log_probs(self, codes, logits):
        """Per-dimension log-probabilities (N, D) of codes under logits (N, D, P)."""
        if self.levels == 2:
            return -F.binary_cross_entropy_with_logits(logits[:, :, 0], codes.to(logits.dtype), reduction="none")
        return torch.log_softmax(logits, 2).gather(2, codes[:, :, None])[:, :, 0]

    def forward(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """Logits of the current mask set: (N, D) (levels == 2) or (N, D, levels), natural layout."""
        self.no_cond("MADE", cond)
        lg = self.logits_of(self.flat(x), int(self.mask_index) if self._single is None else self._single)
        return lg[:, :, 0] if self.levels == 2 else lg

    def nll(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """Negative log-likelihood per example in nats, (N,): in train mode of the next mask set (see the
        module docstring), in eval mode of the ensemble (log-mean-exp over the sets)."""
        self.no_cond("MADE", cond)
        codes = self.flat(x)
        if self.training and self._single is None and self.num_masks > 1:
            self.update_masks()
        ks = self.components()
        lps = torch.stack([self._log_probs(codes, self.logits_of(codes, k)).sum(1) for k in ks])   # (K, N)
        return -(torch.logsumexp(lps, 0) - math.log(len(ks)))

    # ---- sampling ----------------------------------------------------------------------------

    def _sampling_components(self):
        ks = self.components()
        order = self.orders[ks[0]]
        if any(not torch.equal(self.orders[k], order) for k in ks[1:]):
            raise ValueError("MADE: an ensemble over several orderings has no step-by-step conditionals (its mixture "
                             "would need each ordering's marginals), so it cannot be sampled on the protocol; draw "
                             "from one mask set with `with model.single_mask(k): model.sample(...)`")
        return ks, order

    def mixture_params(self, codes: torch.Tensor, ks, order) -> torch.Tensor:
        """Every step's parameters (T, N, P) in step order: the components' mixture conditionals."""
        lgs = [self.logits_of(codes, k)[:, order] for k in ks]                        # (N, D, P) step order
        if len(ks) == 1:
            return lgs[0].permute(1, 0, 2)
        lg = torch.stack(lgs)                                                          # (K, N, D, P)
        lp = torch.stack([self._log_probs(codes[:, order], g) for g in lgs])           # (K, N, D)
        w = F.pad(torch.cumsum(lp, 2)[:, :, :-1], (1, 0))                              # before each step
        if self.levels == 2:
            p = (torch.logsumexp(w[..., None] + F.logsigmoid(lg), 0)
                 - torch.logsumexp(w[..., None] + F.logsigmoid(-lg), 0))
        else:
            p = torch.logsumexp(w[..., None] + torch.log_softmax(lg, 3), 0)
        return p.permute(1, 0, 2)

    def sequence(self, n=None, shape=None, cond=None):
        from fastar.sampling import Sequence

        n, shape = self.sample_args(n, shape, cond)
        ks, order = self._sampling_components()
        head = Bernoulli() if self.levels == 2 else Categorical(self.levels)

        def forward(values, t=None):
            per = self.mixture_params(values, ks, order)
            return per if t is None else per[t]

        return Sequence(n=n, steps=self.in_features, head=head, forward=forward, slots=order.cpu(), shape=shape)

    def pack(self, ks, order, dtype=None):
        """The degree-bucket sampler's (counts, pack, config, output biases (K, D P), hidden biases (K, sum H))
        for mask sets ks (:func:`fastar.ops.made.pack_made`)."""
        dtype = dtype or self.out.weight.dtype
        # Packed once per weights: a repeated sample() of an unchanged model reuses the pack.
        key = (tuple(ks), dtype, str(self.out.weight.device), order.tolist(),
               tuple((p.data_ptr(), p._version) for p in self.parameters()))
        hit = getattr(self, "_pack_cache", None)
        if hit is not None and hit[0] == key:
            return hit[1]
        res = self._pack(ks, order, dtype)
        self._pack_cache = (key, res)
        return res

    def _pack(self, ks, order, dtype):
        ws = [[] for _ in self.layers]
        bs = [l.bias.detach().to(dtype).expand(len(ks), -1) for l in self.layers]
        wo, wd, degs = [], [], [[] for _ in self.layers]
        for k in ks:
            ms, mo, md = self.masks(k)
            _, hid = self.degrees(k)
            for l, (layer, m) in enumerate(zip(self.layers, ms)):
                ws[l].append((layer.weight.detach() * m).to(dtype))
                degs[l].append(hid[l])
            wo.append((self.out.weight.detach() * mo).to(dtype))
            if self.direct is not None:
                wd.append((self.direct.weight.detach() * md).to(dtype))
        counts, pack, config, hid_b = _made.pack_made([torch.stack(w) for w in ws], bs, torch.stack(wo),
                                                      torch.stack(wd) if wd else None,
                                                      [torch.stack(d) for d in degs], order, self.levels)
        out_b = self.out.bias.detach().to(dtype)[order.to(self.out.bias.device).repeat_interleave(self.P) * self.P
                                                 + torch.arange(self.P, device=order.device).repeat(
                                                     self.in_features)]
        return counts, pack, config, out_b.expand(len(ks), -1).contiguous(), hid_b

    def allocate_inference_cache(self, run, fused=None):
        ks, order = self._sampling_components()
        return _DegreeBuckets(self, run, ks, order, fused=fused is not False)


class _DegreeBuckets(InferenceCache):
    """The one-pass sampler. Fused (``draws = True``): :func:`fastar.ops.made_sample_steps` runs every step
    in one call (C++ on CPU, one kernel launch on CUDA, the PyTorch twin elsewhere), drawing from the
    engine's uniforms. Per-op: the same buckets step by step (``made_step_params`` / ``made_step_update``),
    the engine draws."""

    capturable = False

    def __init__(self, model, run, ks, order, fused=True):
        super().__init__(run)
        counts, pack, config, out_b, hid_b = model.pack(ks, order, run.acc)
        dev = run.device
        self.counts, self.pack, self.config = counts.to(dev), [p.to(dev) for p in pack], config
        self.cnt = counts.tolist()
        self.order = order.to(dev)
        self._init = (out_b, hid_b)
        self._state = None
        self.levels = model.levels
        self.draws = fused
        if fused:
            self.params = torch.zeros(run.seq.n, 1 if model.levels == 2 else model.levels, dtype=run.acc, device=dev)

    @property
    def state(self):
        # Allocated (and the given values gathered) on the first step, under the engine's thread choice for
        # the steps (on a loaded CPU, torch's fills on all threads cost more than the whole sample).
        if self._state is None:
            run = self.run
            self._state = _made.MadeState(run.seq.n, self.counts, self.config, *self._init, run.acc, run.device)
            if self.draws:
                self._state.params = self.params
                self.noise = run.noise[:, :, 0].contiguous()
                self.given = self.given_mask = None
                if run.given_mask is not None:
                    self.given = run.given_values[:, self.order].contiguous()
                    self.given_mask = run.given_mask[:, self.order].contiguous()
        return self._state

    def plan(self, t):
        return "chunk", self.run.seq.steps

    def advance(self, key, t, k):
        s, run = self.state, self.run
        cfg = list(self.config)
        cfg[1] = k
        _made.made_sample_steps(s.codes, s.hidden, s.acc, s.logw, run.t, s.params, self.noise, self.given,
                                self.given_mask, self.counts, self.pack, cfg, run.temperature)
        cols = self.order[t:t + k]
        run.values.index_copy_(1, cols, s.codes[:, t:t + k].to(run.values.dtype))

    def step(self, key, t):
        return _made.made_step_params(self.state.acc, self.state.logw, t, self.levels).to(self.run.acc)

    def update(self, key, t, values):
        s = self.state
        _made.made_step_update(s.codes, s.hidden, s.acc, s.logw, values[:, 0].to(torch.int64), t, self.cnt,
                               self.pack, self.config)


def _config(data: dict) -> dict:
    shape = tuple(data["shape"])
    return dict(in_features=math.prod(shape), hidden_sizes=[500], levels=data["levels"], shape=shape)


register(ModelSpec(
    name="made", cls=MADE, kind="image", datasets=("binarized_mnist", "mnist", "digits"), default_config=_config,
    writer="png", demo=dict(data="binarized_mnist", batch_size=100, lr=1e-3),
    tiny=(dict(config=dict(in_features=5, hidden_sizes=[7, 6], num_masks=2, connectivity="agnostic",
                           natural_ordering=True, direct=True, seed=3), shape=(5,)),
          dict(config=dict(in_features=6, hidden_sizes=[15], shape=(1, 2, 3)), shape=(2, 3)),
          dict(config=dict(in_features=4, hidden_sizes=[6], levels=3, direct=True, seed=1), shape=(4,)),
          dict(config=dict(in_features=5, hidden_sizes=[4, 4, 4], levels=3, num_masks=3, connectivity="agnostic",
                           natural_ordering=True, seed=2), shape=(5,))),
    description="MADE: masked autoencoder, order/connectivity-agnostic masks, one-pass degree-bucket sampler"))
