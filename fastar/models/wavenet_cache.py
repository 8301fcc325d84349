"""WaveNet's inference caches for :mod:`fastar.sampling`: one ring-buffer queue per layer.

- :class:`WaveNetFusedCache` (``draws = True``): the whole network, the head and the draw in
  :func:`fastar.ops.wavenet_step`, many steps per call (256 per CPU call; 64 per CUDA graph
  replay), drawing from the engine's uniforms; used wherever the kernel is built for the
  device and dtype.
- :class:`WaveNetQueueCache` (the per-op fallback): per layer one
  :func:`fastar.ops.causal_conv1d_update` on its ring buffer (the state as long as the
  dilation, indexed by ``t mod ((k - 1) d)``: nothing is shifted), the gate, the residual and
  skip 1x1s and the head; the engine draws.

Both read the step index from the engine's device counter ``run.t``, so a step can be captured
in a CUDA graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastar import _backend
from fastar.ops import wavenet as _wn
from fastar.sampling.protocol import InferenceCache

__all__ = ["allocate", "WaveNetFusedCache", "WaveNetQueueCache"]


def _prime_only(run) -> bool:
    """Whether the given values are exactly the prime (the first P samples of every clip): what the
    fused op keeps; any other mask (a prefix with gaps) runs on the per-op cache."""
    if run.given_mask is None:
        return run.seq.num_prime == 0
    want = torch.zeros_like(run.given_mask)
    want[:, :run.seq.num_prime] = True
    return torch.equal(run.given_mask, want)


def _prime_length(run) -> int:
    if not _prime_only(run):
        raise ValueError("WaveNet: the fused step keeps only a prime (the first P samples of every clip) as given "
                         "values; run other masks with fused=False")
    return run.seq.num_prime


class WaveNetFusedCache(InferenceCache):
    draws = True
    reads_values = True     # a step reads the previous sample from run.values (the queues hold layer inputs)

    def __init__(self, model, run):
        super().__init__(run)
        n, dev, acc = run.seq.n, run.device, run.acc
        self.model = model
        self.weights = model.pack()
        self.queues = torch.zeros(n, sum(_wn.queue_sizes(model.dilations, model.kernel_size)),
                                  model.residual_channels, dtype=acc, device=dev)
        self.params = torch.zeros(n, model.out2.weight.shape[0], dtype=acc, device=dev)
        # The op wants (B, T) uniforms (softmax) or (B, 2, T) (mixture); the engine holds (T, B, U).
        noise = run.noise.permute(1, 2, 0)
        self.noise = (noise if model.head_kwargs() else noise[:, 0]).contiguous()
        cond = run.seq.step_cond
        self.cond = None if cond is None else cond.to(run.dtype).contiguous()
        self.num_prime = _prime_length(run)
        self.chunk = 64 if dev.type == "cuda" else 256
        # The op's arguments change only by the step index, which the op reads from run.t: they are
        # built and checked (_check_step, over the whole run's uniforms) here, once, and each advance
        # calls the kernel (or, under the reference backend, its twin) directly. A one-step call (the
        # codec's) would otherwise pay more for rebuilding and rechecking them than for the step; the
        # kernel still parses its arguments every call (csrc/wavenet.h), so nothing unchecked reaches it.
        kernel = _backend.use_kernel("wavenet_step", dev, run.dtype, _wn.STEP_KERNEL_DTYPES)
        self._op = torch.ops.fastar.wavenet_step if kernel else _wn._step_impl
        self._args = {}
        _wn._check_step("wavenet_step" if kernel else "wavenet_step_ref",
                        *self._op_args(max(1, run.seq.steps - int(run.t[0]))))

    def _op_args(self, k):
        args = self._args.get(k)
        if args is None:
            run = self.run
            args = self._args[k] = _wn.wavenet_op_args(
                run.values, self.queues, run.t, self.params, self.noise, self.cond, self.weights, self.num_prime,
                run.temperature, self.model.start_arg, num_steps=k, **self.model.head_kwargs())
        return args

    def plan(self, t):
        return "chunk", self.chunk

    def advance(self, key, t, k):
        self._op(*self._op_args(k))


class WaveNetQueueCache(InferenceCache):
    def __init__(self, model, run):
        super().__init__(run)
        n, dev, dt = run.seq.n, run.device, run.dtype
        self.model = model
        self.mixture = bool(model.head_kwargs())
        k = model.kernel_size
        self.states = [torch.zeros(n, model.residual_channels, (k - 1) * d, dtype=dt, device=dev)
                       for d in model.dilations]
        cond = run.seq.step_cond
        self.cond = None if cond is None else cond.to(dt)            # (B, Tc, L, 2D)
        self.start = torch.full((n,), float(model.start_arg) if self.mixture else model.start_arg,
                                dtype=run.values.dtype, device=dev)
        w = model.input_conv.weight[:, :, 0]                          # (R, A) or (R, 1)
        self.in_w, self.in_b = w.t().contiguous(), model.input_conv.bias
        self.rs = [(torch.cat([r.weight[:, :, 0], s.weight[:, :, 0]], 0).t().contiguous(), torch.cat([r.bias, s.bias]))
                   for r, s in zip(model.res_convs, model.skip_convs)]
        self.R, self.D = model.residual_channels, model.dilation_channels
        self.head = (model.out1.weight[:, :, 0].t(), model.out1.bias, model.out2.weight[:, :, 0].t(), model.out2.bias)

    def step(self, key, t_host):
        run, m = self.run, self.model
        t = run.t
        prev = run.values.index_select(1, (t - 1).clamp_min(0)).squeeze(1)
        prev = torch.where(t == 0, self.start, prev)
        if self.mixture:
            h = torch.addmm(self.in_b, prev.to(self.in_w.dtype).unsqueeze(1), self.in_w)
        else:
            h = self.in_w.index_select(0, prev) + self.in_b
        skip = None
        tc = None if self.cond is None else (t if self.cond.shape[1] > 1 else torch.zeros_like(t))
        for li, (conv, d) in enumerate(zip(m.dilated_convs, m.dilations)):
            a = _wn.causal_conv1d_update(h, self.states[li], conv.weight, conv.bias, d, t)
            if tc is not None:
                a = a + self.cond.index_select(1, tc)[:, 0, li]
            z = torch.tanh(a[:, :self.D]) * torch.sigmoid(a[:, self.D:])
            rs = torch.addmm(self.rs[li][1], z, self.rs[li][0])
            h = h + rs[:, :self.R]
            skip = rs[:, self.R:] if skip is None else skip + rs[:, self.R:]
        w1, b1, w2, b2 = self.head
        return torch.addmm(b2, F.relu(torch.addmm(b1, F.relu(skip), w1)), w2).to(run.acc)


def allocate(model, run, fused=None):
    """The inference cache of a WaveNet for one run: fused where ``wavenet_step``'s kernel is built."""
    can_fuse = _backend.use_kernel("wavenet_step", run.device, run.dtype, _wn.STEP_KERNEL_DTYPES)
    if fused is None:
        fused = can_fuse and _prime_only(run)
    return WaveNetFusedCache(model, run) if fused else WaveNetQueueCache(model, run)
