"""Dilated causal queues: the op family behind fast WaveNet generation.

``causal_conv1d_update(x, state, weight, bias, dilation, position)`` is one time step of a
dilated causal convolution. With ``k = weight.shape[-1]``, ``d = dilation`` and
``t = position`` it returns::

    y = bias + sum_j weight[:, :, j] @ x_{t - (k-1-j) d}          (x_t is the input x)

i.e. the last output column of ``F.conv1d(F.pad(xs, ((k-1)*d, 0)), weight, bias, dilation=d)``
on the whole history ``xs``. Past inputs live in ``state`` (B, C_in, (k-1)*d), a ring
buffer: x_s sits in slot ``s mod ((k-1)*d)``; the step reads its k-1 past taps and then
writes x_t into slot ``t mod ((k-1)*d)`` in place (nothing is shifted). A zero state means
zero padding before time 0.

``wavenet_step(samples, queues, position, logits, noise, cond, in_w, in_b, conv_w, conv_b,
res_skip_w, res_skip_b, out1_w, out1_b, out2_w, out2_b, dilations, num_prime, temperature,
start, num_steps=1, num_mixtures=0, num_bits=8)`` runs ``num_steps`` time steps (one call, so
the per-call overhead is paid once per chunk) of a whole WaveNet (see :class:`fastar.models.WaveNet`),
reading the step index ``p`` from the device tensor ``position`` so that the call can be
captured in a CUDA graph and replayed:

1. input: ``c = samples[:, p-1]`` (``start`` when p == 0); ``h = in_w[c] + in_b``;
2. for each layer l with dilation d: ``a = conv_b[l] + sum_j q_l(p-(k-1-j)d) @ conv_w[l, j]
   + h @ conv_w[l, k-1] + cond[:, p or 0, l]``; ``z = tanh(a[:, :D]) * sigmoid(a[:, D:])``;
   ``rs = z @ res_skip_w[l] + res_skip_b[l]``; write h into the layer's queue;
   ``h += rs[:, :R]``; ``skip += rs[:, R:]``;
3. head: ``logits = relu(relu(skip) @ out1_w + out1_b) @ out2_w + out2_b`` (written into
   ``logits``);
4. sampling: ``samples[:, p] = categorical_sample(logits, noise=noise[:, p],
   temperature=temperature)`` unless ``p < num_prime`` (primed positions are kept);
   then ``position += 1``; repeated ``num_steps`` times.

Mixture head (``num_mixtures = K > 0``): ``A = 3K`` (out2 gives K logits, K means, K
log-scales, the layout of :func:`fastar.ops.discretized_mix_logistic_nll`'s audio variant);
samples (B, T) holds audio values in the acc dtype (float64 for float64 weights, else float32);
step 1 reads ``x = samples[:, p-1]`` (0.0 when p == 0, ``start`` is ignored) and ``h = x *
in_w[0] + in_b`` with in_w (1, R); step 4 is ``samples[:, p] =
sample_discretized_mix_logistic(logits[:, :, None], K, noise=noise[:, :, p, None],
temperature=temperature, num_bits=num_bits)`` with noise (B, 2, T) in the acc dtype (channel 0
picks the component, channel 1 drives the logistic draw); ``logits`` then holds the 3K params.

Layouts (weights are pre-packed once, as ``x @ W`` with W stored (in, out), so the
kernels stream each matrix row by row): samples (B, T) int64; queues (B, sum_l
(k-1)*d_l, R), layer l's ring buffer at rows ``[off_l, off_l + (k-1)*d_l)``; position
(1,) int64; logits (B, A); noise (B, T) uniforms in [0, 1); cond None or (B, Tc, L, 2D)
with Tc = 1 (constant, e.g. global conditioning) or Tc = T (per step); in_w (A, R);
in_b (R,); conv_w (L, k, R, 2D); conv_b (L, 2D); res_skip_w (L, D, R + S);
res_skip_b (L, R + S); out1_w (S, S); out1_b (S,); out2_w (S, A); out2_b (A,).

The compiled op ``torch.ops.fastar.wavenet_step(samples, queues, position, logits, noise, cond, pack,
config, temperature)`` takes the weights as one ``Tensor[] pack`` (:data:`PACK_FIELDS` order:
:meth:`WaveNetWeights.to_pack`) and every integer as one ``int[] config`` ([num_prime, start,
num_steps, num_mixtures, num_bits, dilation of each layer...]: :meth:`WaveNetWeights.config`);
:func:`wavenet_op_args` builds its argument tuple from the named form above.

Devices and dtypes: CPU kernels float32 and float64 (float32 with AVX2/FMA when the CPU
has it); CUDA kernels float32 and float64 (and, for ``wavenet_step``, float16/bfloat16
weights with float32 accumulation). Neither op is differentiable: they are decoding
steps (train with the full-sequence layers).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastar import _backend
from fastar.ops._common import check_same_device, check_temperature, check_tensor, check_uniforms, host_checkable
from fastar.ops.mixture import categorical_sample_ref, sample_discretized_mix_logistic_ref

__all__ = ["causal_conv1d_update", "causal_conv1d_update_ref", "wavenet_step", "wavenet_step_ref",
           "queue_sizes", "WaveNetWeights", "wavenet_step_packed"]

KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64),
}
STEP_KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


def queue_sizes(dilations, kernel_size):
    """Ring-buffer length per layer: (kernel_size - 1) * dilation."""
    return [(kernel_size - 1) * int(d) for d in dilations]


def _position_tensor(op, position, device):
    if isinstance(position, torch.Tensor):
        if position.dtype != torch.int64 or position.numel() != 1:
            raise TypeError(f"{op}: position must be an int or a one-element int64 tensor, got "
                            f"{position.dtype} of shape {list(position.shape)}")
        if position.device != device:
            raise ValueError(f"{op}: position is on {position.device} but state on {device}")
        return position.reshape(1)
    if isinstance(position, bool) or not isinstance(position, int):
        raise TypeError(f"{op}: position must be an int or a one-element int64 tensor, got {position!r}")
    if position < 0:
        raise ValueError(f"{op}: position must be non-negative, got {position}")
    return torch.tensor([position], dtype=torch.int64, device=device)


def _check_update(op, x, state, weight, bias, dilation):
    check_tensor(op, "x", x, dim=2, layout="(B, C_in)")
    check_tensor(op, "state", state, dim=3, layout="(B, C_in, (k-1)*dilation)")
    check_tensor(op, "weight", weight, dim=3, layout="(C_out, C_in, k)")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"{op}: dilation must be a positive int, got {dilation!r}")
    b, c_in = x.shape
    c_out, wc_in, k = weight.shape
    if wc_in != c_in:
        raise ValueError(f"{op}: x has {c_in} channels but weight expects {wc_in} (weight shape {list(weight.shape)})")
    need = (k - 1) * dilation
    if tuple(state.shape) != (b, c_in, need):
        raise ValueError(f"{op}: state must have shape [{b}, {c_in}, {need}] (batch, channels, (kernel_size - 1) * "
                         f"dilation = ({k} - 1) * {dilation}), got {list(state.shape)}")
    for name, t in (("state", state), ("weight", weight)):
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} dtype {t.dtype} must match x dtype {x.dtype}")
    if bias is not None:
        check_tensor(op, "bias", bias, dim=1, layout="(C_out,)")
        if bias.shape[0] != c_out:
            raise ValueError(f"{op}: bias must have length {c_out} (out channels), got {bias.shape[0]}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: bias dtype {bias.dtype} must match x dtype {x.dtype}")
    check_same_device(op, x=x, state=state, weight=weight, bias=bias)


def _update_impl(x, state, weight, bias, dilation, pos):
    k = weight.shape[-1]
    n = state.shape[-1]
    taps = []
    if k > 1:
        # slots of x_{t - (k-1-j) d} for j = 0 .. k-2, in tap order.
        back = torch.arange((k - 1) * dilation, 0, -dilation, device=state.device)
        slots = torch.remainder(pos - back, n)
        taps.append(state.index_select(2, slots))
    taps.append(x.unsqueeze(2))
    cols = torch.cat(taps, 2)  # (B, C_in, k)
    y = torch.einsum("bik,oik->bo", cols, weight)
    if bias is not None:
        y = y + bias
    if k > 1:
        state.index_copy_(2, torch.remainder(pos, n), x.unsqueeze(2))
    return y


def causal_conv1d_update_ref(x, state, weight, bias, dilation, position):
    """Reference of :func:`causal_conv1d_update` in pure PyTorch (any device and dtype)."""
    _check_update("causal_conv1d_update_ref", x, state, weight, bias, dilation)
    pos = _position_tensor("causal_conv1d_update_ref", position, state.device)
    # The CPU kernel refuses a negative step index; so does its twin (a ring buffer would wrap it).
    if host_checkable(pos) and int(pos[0]) < 0:
        raise ValueError(f"causal_conv1d_update_ref: position must be non-negative, got {int(pos[0])}")
    return _update_impl(x, state, weight, bias, dilation, pos)


def causal_conv1d_update(x, state, weight, bias, dilation, position):
    """One decoding step of a dilated causal conv1d with a ring-buffer state (see the module docstring).

    x: (B, C_in); state: (B, C_in, (k-1)*dilation), updated in place; weight: (C_out, C_in, k)
    (nn.Conv1d layout); bias: (C_out,) or None; position: int or one-element int64 tensor (the
    time index t of x). Returns (B, C_out). PyTorch equivalent: the last column of
    ``F.conv1d(F.pad(history, ((k-1)*d, 0)), weight, bias, dilation=d)``.
    """
    _check_update("causal_conv1d_update", x, state, weight, bias, dilation)
    pos = _position_tensor("causal_conv1d_update", position, state.device)
    if _backend.use_kernel("causal_conv1d_update", x.device, x.dtype, KERNEL_DTYPES):
        return torch.ops.fastar.causal_conv1d_update(x, state, weight, bias, dilation, pos)
    if host_checkable(pos) and int(pos[0]) < 0:
        raise ValueError(f"causal_conv1d_update: position must be non-negative, got {int(pos[0])}")
    return _update_impl(x, state, weight, bias, dilation, pos)


# ---------------------------------------------------------------------------------------------
# wavenet_step


def _check_step(op, samples, queues, position, logits, noise, cond, pack, config, temperature):
    """The Python side's one check of wavenet_step's arguments, in the op's (pack, config) form: run by the
    public function before the kernel or the twin (csrc/wavenet.h's parse_wavenet_step is the kernel's own)."""
    if not isinstance(pack, (list, tuple)) or len(pack) != len(PACK_FIELDS):
        raise TypeError(f"{op}: pack must list the {len(PACK_FIELDS)} weights ({', '.join(PACK_FIELDS)}), got "
                        f"{len(pack) if isinstance(pack, (list, tuple)) else type(pack).__name__}")
    if not isinstance(config, (list, tuple)) or len(config) < len(CONFIG_FIELDS):
        raise TypeError(f"{op}: config must be [{', '.join(CONFIG_FIELDS)}, dilations...], got {config!r}")
    weights, (num_prime, start, num_steps, num_mixtures, num_bits) = _unpack(pack, config)
    in_w, in_b, conv_w, conv_b, res_skip_w, res_skip_b, out1_w, out1_b, out2_w, out2_b, dilations = weights
    check_tensor(op, "conv_w", conv_w, dim=4, layout="(L, k, R, 2D)")
    L, k, R, D2 = conv_w.shape
    if D2 % 2:
        raise ValueError(f"{op}: conv_w's last dim (2 * dilation channels) must be even, got {D2}")
    D = D2 // 2
    check_tensor(op, "res_skip_w", res_skip_w, dim=3, layout="(L, D, R + S)")
    S = res_skip_w.shape[2] - R
    if res_skip_w.shape[0] != L or res_skip_w.shape[1] != D or S < 1:
        raise ValueError(f"{op}: res_skip_w must have shape [{L}, {D}, {R} + S] (layers, dilation channels, "
                         f"residual + skip channels), got {list(res_skip_w.shape)}")
    check_tensor(op, "out2_w", out2_w, dim=2, layout="(S, A)")
    A = out2_w.shape[1]
    dt = conv_w.dtype
    if isinstance(num_mixtures, bool) or not isinstance(num_mixtures, int) or num_mixtures < 0:
        raise ValueError(f"{op}: num_mixtures must be 0 (softmax head) or a positive int, got {num_mixtures!r}")
    mixture = num_mixtures > 0
    if mixture:
        if A != 3 * num_mixtures:
            raise ValueError(f"{op}: out2_w has {A} output columns, but num_mixtures={num_mixtures} needs 3K = "
                             f"{3 * num_mixtures} (K logits, K means, K log-scales)")
        if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 1 <= num_bits <= 16:
            raise ValueError(f"{op}: num_bits must be an int in [1, 16], got {num_bits!r}")
    want = {"in_w": (in_w, (1 if mixture else A, R)), "in_b": (in_b, (R,)), "conv_b": (conv_b, (L, D2)),
            "res_skip_b": (res_skip_b, (L, R + S)), "out1_w": (out1_w, (S, S)), "out1_b": (out1_b, (S,)),
            "out2_w": (out2_w, (S, A)), "out2_b": (out2_b, (A,)), "logits": (logits, None)}
    for name, (t, shape) in want.items():
        check_tensor(op, name, t)
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
        if name != "logits" and t.dtype != dt:
            raise TypeError(f"{op}: {name} dtype {t.dtype} must match conv_w dtype {dt}")
    acc = torch.float64 if dt == torch.float64 else torch.float32
    want_dt, what = (acc, "audio values (mixture head)") if mixture else (torch.int64, "codes")
    if not isinstance(samples, torch.Tensor) or samples.dtype != want_dt or samples.dim() != 2:
        raise TypeError(f"{op}: samples must be a 2-D (B, T) {want_dt} tensor of {what}, got "
                        f"{getattr(samples, 'dtype', type(samples).__name__)} of shape "
                        f"{list(getattr(samples, 'shape', []))}")
    B, T = samples.shape
    if logits.dtype != acc or tuple(logits.shape) != (B, A):
        raise ValueError(f"{op}: logits must be a ({B}, {A}) {acc} tensor (batch, quantization levels), got "
                         f"{logits.dtype} of shape {list(logits.shape)}")
    if len(dilations) != L or any(int(d) < 1 for d in dilations):
        raise ValueError(f"{op}: dilations must list {L} positive ints (one per layer), got {list(dilations)}")
    ntot = sum(queue_sizes(dilations, k))
    check_tensor(op, "queues", queues, dim=3, layout="(B, sum_l (k-1)*d_l, R)")
    if tuple(queues.shape) != (B, ntot, R):
        raise ValueError(f"{op}: queues must have shape [{B}, {ntot}, {R}] (batch, sum over layers of (kernel_size "
                         f"- 1) * dilation, residual channels), got {list(queues.shape)}")
    if queues.dtype != acc:
        raise TypeError(f"{op}: queues must be {acc}, got {queues.dtype}")
    if not isinstance(position, torch.Tensor) or position.dtype != torch.int64 or tuple(position.shape) != (1,):
        raise TypeError(f"{op}: position must be a (1,) int64 tensor (the step counter), got "
                        f"{getattr(position, 'dtype', type(position).__name__)}")
    if mixture:
        check_tensor(op, "noise", noise, dim=3, layout="(B, 2, T)")
        if tuple(noise.shape) != (B, 2, T):
            raise ValueError(f"{op}: noise must have shape [{B}, 2, {T}] (a component and a logistic uniform per "
                             f"sample, mixture head), got {list(noise.shape)}")
        if noise.dtype != acc:
            raise TypeError(f"{op}: noise must be {acc} for {dt} weights (mixture head), got {noise.dtype}")
    else:
        check_tensor(op, "noise", noise, dim=2, layout="(B, T)")
        if tuple(noise.shape) != (B, T):
            raise ValueError(f"{op}: noise must have shape [{B}, {T}] (one uniform per sample), got "
                             f"{list(noise.shape)}")
    if cond is not None:
        check_tensor(op, "cond", cond, dim=4, layout="(B, Tc, L, 2D)")
        if cond.shape[0] != B or cond.shape[2:] != (L, D2) or cond.shape[1] not in (1, T):
            raise ValueError(f"{op}: cond must have shape [{B}, 1 or {T}, {L}, {D2}] (batch, time, layers, "
                             f"2 * dilation channels), got {list(cond.shape)}")
        if cond.dtype != dt:
            raise TypeError(f"{op}: cond dtype {cond.dtype} must match conv_w dtype {dt}")
    check_temperature(op, temperature)
    if num_steps < 1:
        raise ValueError(f"{op}: num_steps must be at least 1, got {num_steps}")
    if not mixture and not 0 <= int(start) < A:
        raise ValueError(f"{op}: start must be a code in [0, {A}), got {start}")
    check_same_device(op, samples=samples, queues=queues, position=position, logits=logits, noise=noise, cond=cond,
                      in_w=in_w, conv_w=conv_w, res_skip_w=res_skip_w, out2_w=out2_w)
    # Only the uniforms these num_steps steps draw with: the whole (B, T) noise every call would
    # cost O(T) per step. CPU only (see host_checkable); position is read on the host there anyway.
    if host_checkable(noise):
        p = int(position[0])
        used = noise[..., max(p, 0):p + num_steps]
        check_uniforms(op, f"noise[..., {p}:{p + num_steps}]", used)


def _step_impl(samples, queues, position, logits, noise, cond, pack, config, temperature):
    """The twin of ``torch.ops.fastar.wavenet_step``, in the op's own (pack, config) form (checked by _check_step)."""
    weights, (num_prime, start, num_steps, num_mixtures, num_bits) = _unpack(pack, config)
    in_w, in_b, conv_w, conv_b, res_skip_w, res_skip_b, out1_w, out1_b, out2_w, out2_b, dilations = weights
    # A decoding step is not differentiable (it writes its results in place); weights straight from a model's
    # parameters would otherwise make every op of every step record an autograd graph.
    with torch.no_grad():
        # Everything that does not depend on the step (weights in the acc dtype, per-layer views, ring-buffer
        # slot offsets) is prepared once per call, so a chunk of steps pays only for the step's own ops.
        plan = _StepPlan(queues, cond, in_w, in_b, conv_w, conv_b, res_skip_w, res_skip_b, out1_w, out1_b, out2_w,
                         out2_b, dilations, start)
        for _ in range(num_steps):
            _planned_step(plan, samples, queues, position, logits, noise, cond, num_prime, temperature,
                          num_mixtures, num_bits)


class _StepPlan:
    """The step-invariant half of the reference step, built once per call.

    Weights cast to the acc dtype, per-layer views, ring-buffer slot offsets and the step's
    work buffers (reused by every step of the call: each step consumes them fully), so that a
    step is a handful of torch calls per layer with no allocation and no host read.
    """

    def __init__(self, queues, cond, in_w, in_b, conv_w, conv_b, res_skip_w, res_skip_b, out1_w, out1_b, out2_w,
                 out2_b, dilations, start):
        L, k, R, D2 = conv_w.shape
        D, S = D2 // 2, res_skip_w.shape[2] - R
        B, acc, dev = queues.shape[0], queues.dtype, queues.device
        self.k, self.R = k, R
        self.in_w, self.in_b = in_w.to(acc), in_b.to(acc)
        self.start = torch.tensor(int(start), device=dev)
        self.out1_w, self.out1_b, self.out2_w, self.out2_b = (t.to(acc) for t in (out1_w, out1_b, out2_w, out2_b))
        self.w_now = conv_w[:, k - 1].to(acc).unbind(0)  # the tap on the current input, per layer
        self.rs_w, self.rs_b = res_skip_w.to(acc).unbind(0), res_skip_b.to(acc).unbind(0)
        # Conv bias (plus a constant conditioning) as (L, 1 or B, 2D): what each step's pre-activations start from.
        bias = conv_b.to(acc).unsqueeze(1)
        self.local_cond = cond is not None and cond.shape[1] > 1
        if cond is not None and not self.local_cond:
            bias = bias + cond[:, 0].to(acc).transpose(0, 1)
        self.bias = bias
        if k > 1:
            # Layer l's ring buffer is rows [off_l, off_l + n_l) with n_l = (k-1) d_l, and x_s sits in slot
            # s mod n_l; since (k-1) d_l = 0 mod n_l, tap j's input x_{p-(k-1-j)d_l} is in slot (p + j d_l) mod n_l.
            # All layers' past taps are read at the start of the step, before any layer writes its slot p mod n_l,
            # so one gather and one scatter per step serve every layer.
            d = torch.tensor(dilations, device=dev)
            n = (k - 1) * d
            off = torch.cumsum(n, 0) - n
            j = torch.arange(k - 1, device=dev)
            self.read_shift = (j * d[:, None]).flatten()  # (L*(k-1),), layer-major, tap order
            self.read_n = n.repeat_interleave(k - 1)
            self.read_off = off.repeat_interleave(k - 1)
            self.write_n, self.write_off = n, off
            self.w_past = conv_w[:, :k - 1].to(acc).reshape(L, (k - 1) * R, D2)
        # Work buffers: pre-activations (L, B, 2D), whose tanh / sigmoid halves are gated in place;
        # res+skip outputs (L, B, R+S); layer inputs h_l (B, L, R), which go into the queues in one scatter.
        self.pre = torch.empty(L, B, D2, dtype=acc, device=dev)
        self.rs = torch.empty(L, B, R + S, dtype=acc, device=dev)
        self.inputs = torch.empty(B, L, R, dtype=acc, device=dev)
        # (unbind makes a family of per-layer views in one call: a call of one step pays for this too)
        h = self.inputs.unbind(1)
        self.layers = list(zip(self.pre.unbind(0), self.pre[:, :, :D].unbind(0), self.pre[:, :, D:].unbind(0),
                               self.rs.unbind(0), self.rs[:, :, :R].unbind(0), h, h[1:] + (None,), self.w_now,
                               self.rs_w, self.rs_b))
        self.skips = self.rs[:, :, R:]


def _planned_step(plan, samples, queues, position, logits, noise, cond, num_prime, temperature, num_mixtures,
                  num_bits):
    k, R = plan.k, plan.R
    B = samples.shape[0]
    p = position
    prev = samples.index_select(1, torch.clamp(p - 1, min=0)).squeeze(1)
    h0 = plan.inputs[:, 0]
    if num_mixtures:
        prev = torch.where(p > 0, prev, torch.zeros_like(prev))
        torch.addcmul(plan.in_b, prev.unsqueeze(1), plan.in_w, out=h0)
    else:
        prev = torch.where(p > 0, prev, plan.start)
        torch.add(plan.in_w.index_select(0, prev), plan.in_b, out=h0)

    # Past taps and biases of every layer at once.
    if k > 1:
        slots = torch.remainder(p + plan.read_shift, plan.read_n) + plan.read_off
        past = queues.index_select(1, slots).view(B, -1, (k - 1) * R).transpose(0, 1)
        torch.baddbmm(plan.bias, past, plan.w_past, out=plan.pre)
    else:
        plan.pre.copy_(plan.bias.expand_as(plan.pre))
    if plan.local_cond:
        plan.pre.add_(cond.index_select(1, p).squeeze(1).transpose(0, 1))

    for a, a_tanh, a_sigmoid, rs, rs_res, h, h_next, w_now, rs_w, rs_b in plan.layers:
        a.addmm_(h, w_now)
        z = a_tanh.tanh_().mul_(a_sigmoid.sigmoid_())
        torch.addmm(rs_b, z, rs_w, out=rs)
        if h_next is not None:  # the last layer's residual output feeds nothing
            torch.add(h, rs_res, out=h_next)
    if k > 1:
        queues.index_copy_(1, torch.remainder(p, plan.write_n) + plan.write_off, plan.inputs)

    skip = plan.skips.sum(0)
    y = torch.relu(torch.addmm(plan.out1_b, skip.relu_(), plan.out1_w))
    torch.addmm(plan.out2_b, y, plan.out2_w, out=logits)
    if num_mixtures:
        u = noise.index_select(2, p)  # (B, 2, 1)
        new = sample_discretized_mix_logistic_ref(logits.unsqueeze(2), num_mixtures, noise=u,
                                                  temperature=float(temperature), num_bits=num_bits).squeeze(1)
    else:
        u = noise.index_select(1, p).squeeze(1)
        new = categorical_sample_ref(logits, dim=1, noise=u, temperature=float(temperature))
    if num_prime > 0:
        # primed positions keep their value (the step index lives on the device: no host read to branch on)
        new = torch.where(p < num_prime, samples.index_select(1, p).squeeze(1), new)
    samples.index_copy_(1, p, new.unsqueeze(1))
    position.add_(1)


def wavenet_step_ref(samples, queues, position, logits, noise, cond, in_w, in_b, conv_w, conv_b, res_skip_w,
                     res_skip_b, out1_w, out1_b, out2_w, out2_b, dilations, num_prime=0, temperature=1.0,
                     start=128, num_steps=1, num_mixtures=0, num_bits=8):
    """Reference of :func:`wavenet_step`: the "PyTorch queue" path, a few torch ops per layer (any device/dtype)."""
    weights = WaveNetWeights(in_w, in_b, conv_w, conv_b, res_skip_w, res_skip_b, out1_w, out1_b, out2_w, out2_b,
                             dilations)
    wavenet_step_packed(samples, queues, position, logits, noise, cond, weights, num_prime, temperature, start,
                        num_steps, num_mixtures, num_bits, reference=True)


def wavenet_step(samples, queues, position, logits, noise, cond, in_w, in_b, conv_w, conv_b, res_skip_w,
                 res_skip_b, out1_w, out1_b, out2_w, out2_b, dilations, num_prime=0, temperature=1.0, start=128,
                 num_steps=1, num_mixtures=0, num_bits=8):
    """One generation step of a whole WaveNet, fused (see the module docstring for every layout).

    ``num_mixtures=0``: softmax head (samples int64 codes, noise (B, T)); ``num_mixtures=K``:
    discretized logistic mixture head (samples float audio values in the acc dtype, in_w (1, R),
    noise (B, 2, T), ``num_bits`` the quantisation of the draws).

    Mutates samples[:, p] (unless p < num_prime), queues, position (+1) and logits; returns None.
    One fused C++ loop on CPU. On CUDA one persistent launch for all ``num_steps`` steps at batch
    <= 8 (float32/float16/bfloat16 weights held in shared memory), else one launch per step
    (``FASTAR_WAVENET_CUDA_PATH=auto|persistent|blocks`` forces a path); capturable in a CUDA
    graph (the step index is read on the device). PyTorch equivalent: :func:`wavenet_step_ref`.
    """
    weights = WaveNetWeights(in_w, in_b, conv_w, conv_b, res_skip_w, res_skip_b, out1_w, out1_b, out2_w, out2_b,
                             dilations)
    wavenet_step_packed(samples, queues, position, logits, noise, cond, weights, num_prime, temperature, start,
                        num_steps, num_mixtures, num_bits)


# Registrations only when this build of _C has the ops (a stale build falls back to the reference).
if _backend.has_ops("causal_conv1d_update", "wavenet_step"):

    @torch.library.register_fake("fastar::causal_conv1d_update")
    def _causal_conv1d_update_fake(x, state, weight, bias, dilation, position):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("fastar::wavenet_step")
    def _wavenet_step_fake(samples, queues, position, logits, noise, cond, pack, config, temperature):
        return None


class WaveNetWeights(NamedTuple):
    """A WaveNet's weights in :func:`wavenet_step`'s layouts ((in, out) matrices, see the module
    docstring), packed once per run by :meth:`fastar.models.WaveNet.pack`. Its tensors, in this order
    (PACK_FIELDS), are the op's ``Tensor[] pack``; :meth:`config` gives its ``int[] config``
    (CONFIG_FIELDS, then one dilation per layer): csrc/wavenet.h's WaveNetPack / WaveNetConfig read the
    same layouts."""

    in_w: torch.Tensor
    in_b: torch.Tensor
    conv_w: torch.Tensor
    conv_b: torch.Tensor
    res_skip_w: torch.Tensor
    res_skip_b: torch.Tensor
    out1_w: torch.Tensor
    out1_b: torch.Tensor
    out2_w: torch.Tensor
    out2_b: torch.Tensor
    dilations: list

    def to_pack(self) -> list:
        """The op's ``pack``: the tensors in PACK_FIELDS order."""
        return [getattr(self, f) for f in PACK_FIELDS]

    def config(self, num_prime=0, start=128, num_steps=1, num_mixtures=0, num_bits=8) -> list:
        """The op's ``config``: CONFIG_FIELDS, then the dilations. num_mixtures and num_bits go in as
        given, so that _check_step can refuse a non-int with its own sentence."""
        return [int(num_prime), int(start), int(num_steps), num_mixtures, num_bits] + [int(d) for d in self.dilations]


PACK_FIELDS = WaveNetWeights._fields[:-1]
CONFIG_FIELDS = ("num_prime", "start", "num_steps", "num_mixtures", "num_bits")


def _unpack(pack, config):
    """The op's pack and config by name (no checks: _check_step does those): the weights (with the
    dilations) and the CONFIG_FIELDS."""
    return WaveNetWeights(*pack, list(config[len(CONFIG_FIELDS):])), tuple(config[:len(CONFIG_FIELDS)])


def wavenet_op_args(samples, queues, position, logits, noise, cond, weights: WaveNetWeights, num_prime=0,
                    temperature=1.0, start=128, num_steps=1, num_mixtures=0, num_bits=8) -> tuple:
    """``torch.ops.fastar.wavenet_step``'s full argument tuple (samples, queues, position, logits, noise, cond,
    pack, config, temperature), built from the named form."""
    return (samples, queues, position, logits, noise, cond, weights.to_pack(),
            weights.config(num_prime, start, num_steps, num_mixtures, num_bits), float(temperature))


def wavenet_step_packed(samples, queues, position, logits, noise, cond, weights: WaveNetWeights, num_prime=0,
                        temperature=1.0, start=128, num_steps=1, num_mixtures=0, num_bits=8, reference=False):
    """:func:`wavenet_step` (or, with ``reference=True``, :func:`wavenet_step_ref`) with the weights as one
    :class:`WaveNetWeights`: builds the op's (pack, config) once, checks them (_check_step) and runs the kernel
    or the twin."""
    op = "wavenet_step_ref" if reference else "wavenet_step"
    args = wavenet_op_args(samples, queues, position, logits, noise, cond, weights, num_prime, temperature, start,
                           num_steps, num_mixtures, num_bits)
    _check_step(op, *args)
    if not reference and _backend.use_kernel("wavenet_step", weights.conv_w.device, weights.conv_w.dtype,
                                             STEP_KERNEL_DTYPES):
        torch.ops.fastar.wavenet_step(*args)
        return
    _step_impl(*args)
