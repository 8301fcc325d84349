"""MADE sampled in one forward pass: ``made_sample_steps``, the degree-bucket sampler.

A MADE hidden unit of degree m depends only on the inputs at steps < m (step order = the mask's
ordering), so once the value of step t is drawn every unit of degree t + 1, in every layer (in layer
order), is final and never changes; the output of step r needs only last-layer units of degree <= r.
The sampler therefore computes each hidden unit exactly once, pushing every value into the
pre-activations of the units above that see it as soon as it is known, and accumulates each output's
pre-activation as the last layer's units become final: a whole sample costs one masked forward pass at
most (only the unmasked multiply-adds, about half a dense pass, and none for a value that is zero: a
0 pixel or a ReLU that is off) instead of the D passes of the naive sampler.

Everything is laid out in *step order*, the hidden units of each layer sorted by degree, so that the
units a value feeds are a suffix of the layer above (:func:`pack_made` builds this from a model's masked
weights). With K mask components sharing one ordering (an ensemble), the step's distribution is the
ensemble's mixture conditional: component k weighted by its likelihood of the values drawn so far,
``log w_k = sum_{s<t} log p_k(x_s | x_<s)``.

``made_sample_steps(codes, hidden, acc, logw, position, params, noise, given, given_mask, counts, pack,
config, temperature)`` runs ``num_steps`` steps from ``t = position[0]``; per step t:

1. ``l_k = acc[k, :, t P:(t + 1) P]`` (P = 1 logit for levels == 2, else ``levels`` logits); K = 1:
   ``params = l_0``; K > 1: Bernoulli ``params = LSE_k(w_k + logsig(l_k)) - LSE_k(w_k + logsig(-l_k))``,
   categorical ``params[v] = LSE_k(w_k + log_softmax(l_k)[v])``; written to ``params`` (N, P);
2. the draw: :func:`fastar.ops.categorical_sample`'s rule on the uniform ``noise[t]`` (a Bernoulli
   logit is drawn as the categories (0, logit)); where ``given_mask[:, t]``, ``given[:, t]`` instead;
   written to ``codes[:, t]``; K > 1: ``w_k += log p_k(x_t)``;
3. ``v = x_t / (levels - 1)`` is written to ``hidden[k, :, t]`` and pushed: into the outputs of later
   steps (direct connections) ``acc[k, :, (t+1) P:] += v * direct_t[k, t, (t+1) P:]``, and into layer 1's
   units of degree >= t + 1, ``u in [c_1[t], H_1)``: ``pre_1[u] += v * Wt_1[k, t, u]``;
4. every layer l in order: its units of degree t + 1, ``u in [c_l[t], c_l[t+1])``, are complete:
   ``h = relu(pre_l[u])`` replaces the pre-activation, and is pushed into layer l + 1's units of degree
   >= t + 1 (``pre_{l+1}[u'] += h * Wt_{l+1}[k, u, u']``, ``u' in [c_{l+1}[t], H_{l+1})``), or, from the
   last layer, into the outputs ``acc[k, :, (t+1) P:] += h * out_wt[k, u, (t+1) P:]``;

then ``position += num_steps``. ``hidden`` holds, per layer, a unit's pre-activation until its degree's
step, its ReLU output after. Start (:class:`MadeState`): ``acc[k] = output bias``, ``hidden`` = [zeros |
the hidden biases], ``logw = 0``.

Layouts (dt = float32 or float64, all contiguous): codes, given (N, D) int64 and given_mask (N, D)
bool, in step order; hidden (K, N, D + sum H_l): [inputs | layer 1 | ... | layer L]; acc (K, N, D P);
logw (K, N); position (1,) int64; params (N, P); noise (T, N) uniforms in [0, 1) (T >= the last step
run); counts (K, L, D + 1) int64, ``counts[k, l, m]`` = the number of layer l's units of degree <= m;
pack ``[Wt_1, ..., Wt_L, out_wt, direct_t?]`` with Wt_l (K, H_{l-1}, H_l) (H_0 = D; the transposed,
masked weight: row = a unit below, or an input step), out_wt (K, H_L, D P), direct_t (K, D, D P);
config ``[levels, num_steps, direct, H_1, ..., H_L]``.

Kernels: CPU (one C++ loop over the steps, OpenMP over blocks of the batch) and CUDA (one launch, a
thread block per example), float32 and float64; PyTorch twin :func:`made_sample_steps_ref`. Not
differentiable: it is a sampler (there is no gradient to take; train with the masked forward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastar import _backend
from fastar.ops._common import check_temperature, check_uniforms
from fastar.ops.mixture import categorical_sample_ref

__all__ = ["made_sample_steps", "made_sample_steps_ref", "pack_made", "MadeState", "made_step_params",
           "made_step_update"]

KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64)}


def pack_made(weights, biases, out_w, direct_w, degrees, order, levels):
    """The op's (counts, pack, config, hidden biases (K, sum H)) from K mask components sharing one ordering.

    weights[l]: (K, H_l, H_{l-1}) masked weights in the model's natural layout (layer 0's columns are the
    natural input dimensions); biases[l]: (K, H_l); out_w: (K, D P, H_L) masked, rows natural dimension
    major, level minor; direct_w: (K, D P, D) masked or None; degrees[l]: (K, H_l) int64 hidden degrees
    in [1, D]; order: (D,) the natural dimension drawn at each step; levels: 2 (one logit) or more.
    """
    D = order.numel()
    P = 1 if levels == 2 else levels
    order = order.to(weights[0].device)
    out_rows = (order[:, None] * P + torch.arange(P, device=order.device)[None]).flatten()   # step-major rows
    pack, counts, hid_b = [], [], []
    prev_perm = None
    for l, (w, b, deg) in enumerate(zip(weights, biases, degrees)):
        perm = deg.argsort(dim=1, stable=True)                                     # (K, H) units by degree
        w = torch.gather(w, 1, perm[:, :, None].expand(-1, -1, w.shape[2]))
        w = w[:, :, order] if l == 0 else torch.gather(w, 2, prev_perm[:, None, :].expand(-1, w.shape[1], -1))
        pack.append(w.transpose(1, 2).contiguous())
        hid_b.append(torch.gather(b, 1, perm))
        sd = torch.gather(deg, 1, perm)
        m = torch.arange(D + 1, device=deg.device)
        counts.append((sd[:, None, :] <= m[None, :, None]).sum(2))           # (K, D + 1)
        prev_perm = perm
    wo = out_w[:, out_rows]                                                   # (K, D P, H_L) step order
    wo = torch.gather(wo, 2, prev_perm[:, None, :].expand(-1, wo.shape[1], -1))
    pack.append(wo.transpose(1, 2).contiguous())
    direct = direct_w is not None
    if direct:
        dw = direct_w[:, out_rows][:, :, order]                               # (K, D P, D)
        pack.append(dw.transpose(1, 2).contiguous())
    config = [int(levels), 1, int(direct)] + [int(w.shape[1]) for w in weights]
    return torch.stack(counts, 1).to(torch.int64).contiguous(), pack, config, torch.cat(hid_b, 1).contiguous()


class MadeState:
    """The sampler's state for one run, what the op mutates: codes, hidden = [zeros | hidden biases],
    acc = the output biases, logw = 0, params."""

    def __init__(self, n, counts, config, out_b, hid_b, dtype, device):
        levels, _, direct, *H = config
        K, L, D1 = counts.shape
        D = D1 - 1
        P = 1 if levels == 2 else levels
        self.codes = torch.zeros(n, D, dtype=torch.int64, device=device)
        self.hidden = torch.zeros(K, n, D + sum(H), dtype=dtype, device=device)
        self.hidden[:, :, D:] = hid_b.to(device, dtype)[:, None, :]
        # A copy always: at n = 1 the expanded view is already contiguous, and .contiguous() would hand back the
        # (cached) output biases themselves for the sampler to overwrite.
        self.acc = out_b.to(device, dtype)[:, None, :].expand(K, n, D * P).clone(memory_format=torch.contiguous_format)
        self.logw = torch.zeros(K, n, dtype=dtype, device=device)
        self.params = torch.zeros(n, P, dtype=dtype, device=device)


def _check(op, codes, hidden, acc, logw, position, params, noise, given, given_mask, counts, pack, config,
           temperature):
    if not isinstance(config, (list, tuple)) or len(config) < 4 or any(not isinstance(c, int) for c in config):
        raise TypeError(f"{op}: config must be [levels, num_steps, direct, H_1, ..., H_L] ints, got {config!r}")
    levels, steps, direct, *H = config
    L = len(H)
    if levels < 2 or steps < 0 or direct not in (0, 1) or min(H) < 1:
        raise ValueError(f"{op}: config {config!r}: levels >= 2, num_steps >= 0, direct 0/1, widths >= 1")
    if not isinstance(counts, torch.Tensor) or counts.dtype != torch.int64 or counts.dim() != 3 or counts.shape[1] != L:
        raise ValueError(f"{op}: counts must be (K, {L}, D + 1) int64")
    K, _, D1 = counts.shape
    D = D1 - 1
    P = 1 if levels == 2 else levels
    N = codes.shape[0] if isinstance(codes, torch.Tensor) and codes.dim() == 2 else -1
    if len(pack) != L + 1 + direct:
        raise ValueError(f"{op}: pack must hold {L + 1 + direct} tensors (Wt per layer, out_wt"
                         f"{', direct_t' if direct else ''}), got {len(pack)}")
    dt = pack[0].dtype
    if dt not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: weights must be float32 or float64, got {dt}")
    want = {}
    prev = D
    for l in range(L):
        want[f"Wt_{l + 1}"] = (pack[l], (K, prev, H[l]))
        prev = H[l]
    want["out_wt"] = (pack[L], (K, H[-1], D * P))
    if direct:
        want["direct_t"] = (pack[L + 1], (K, D, D * P))
    want.update(hidden=(hidden, (K, N, D + sum(H))), acc=(acc, (K, N, D * P)), logw=(logw, (K, N)),
                params=(params, (N, P)))
    for name, (t, shape) in want.items():
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dt or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous {dt} tensor of shape {list(shape)}, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}")
    if codes.dtype != torch.int64 or tuple(codes.shape) != (N, D) or not codes.is_contiguous():
        raise ValueError(f"{op}: codes must be contiguous (N, {D}) int64")
    if not isinstance(position, torch.Tensor) or position.dtype != torch.int64 or position.numel() != 1:
        raise ValueError(f"{op}: position must be a one-element int64 tensor")
    if not isinstance(noise, torch.Tensor) or noise.dim() != 2 or noise.shape[1] != N or noise.dtype != dt \
            or not noise.is_contiguous():
        raise ValueError(f"{op}: noise must be contiguous (T, {N}) {dt} uniforms")
    if (given is None) != (given_mask is None):
        raise ValueError(f"{op}: given and given_mask come together")
    if given is not None and (given.dtype != torch.int64 or given_mask.dtype != torch.bool
                              or tuple(given.shape) != (N, D) or tuple(given_mask.shape) != (N, D)
                              or not given.is_contiguous() or not given_mask.is_contiguous()):
        raise ValueError(f"{op}: given (N, {D}) int64 and given_mask (N, {D}) bool, contiguous")
    devs = {t.device for t in [codes, hidden, acc, logw, position, params, noise, counts, *pack]
            + ([given, given_mask] if given is not None else [])}
    if len(devs) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devs))}")
    check_temperature(op, temperature)
    if position.device.type == "cpu":
        t0 = int(position[0])
        if t0 < 0 or t0 + steps > min(D, noise.shape[0]):
            raise ValueError(f"{op}: steps [{t0}, {t0 + steps}) run past the {D} steps (or the noise's "
                             f"{noise.shape[0]})")
        check_uniforms(op, "noise", noise[t0:t0 + steps])


def made_step_params(acc, logw, t, levels):
    """Step t's distribution parameters (N, P) from the accumulated pre-activations (the per-op path's
    ``step``; step 1 of the module docstring)."""
    K = acc.shape[0]
    P = 1 if levels == 2 else levels
    lg = acc[:, :, t * P:(t + 1) * P]                                      # (K, N, P)
    if K == 1:
        return lg[0]
    if levels == 2:
        return (torch.logsumexp(logw[:, :, None] + F.logsigmoid(lg), 0)
                - torch.logsumexp(logw[:, :, None] + F.logsigmoid(-lg), 0))
    return torch.logsumexp(logw[:, :, None] + torch.log_softmax(lg, 2), 0)


def made_step_update(codes, hidden, acc, logw, v, t, counts, pack, config):
    """Take step t's drawn codes v (N,) int64 and make every unit of degree t + 1 final (steps 2-4 of the
    module docstring, after the draw): the per-op path's ``update``."""
    levels, _, direct, *H = config
    L = len(H)
    cnt = counts if isinstance(counts, list) else counts.cpu().tolist()
    K, D = len(cnt), len(cnt[0][0]) - 1
    P = 1 if levels == 2 else levels
    codes[:, t] = v
    if K > 1:
        lg = acc[:, :, t * P:(t + 1) * P]
        lp = (F.logsigmoid(torch.where(v[None, :, None] == 1, lg, -lg))[:, :, 0] if levels == 2
              else torch.log_softmax(lg, 2).gather(2, v[None, :, None].expand(K, -1, 1))[:, :, 0])
        logw += lp
    xv = v.to(acc.dtype) / (levels - 1)
    hidden[:, :, t] = xv
    c0 = (t + 1) * P
    if direct:
        acc[:, :, c0:] += xv[None, :, None] * pack[L + 1][:, t, c0:][:, None, :]
    offs = [D]
    for h in H:
        offs.append(offs[-1] + h)
    for k in range(K):
        a1 = cnt[k][0][t]
        hidden[k, :, offs[0] + a1:offs[1]] += xv[:, None] * pack[0][k, t, a1:][None, :]
        for l in range(L):
            a, b = cnt[k][l][t], cnt[k][l][t + 1]
            if a == b:
                continue
            h = torch.relu(hidden[k, :, offs[l] + a:offs[l] + b])                  # complete now
            hidden[k, :, offs[l] + a:offs[l] + b] = h
            if l < L - 1:
                a2 = cnt[k][l + 1][t]
                hidden[k, :, offs[l + 1] + a2:offs[l + 2]] += h @ pack[l + 1][k, a:b, a2:]
            else:
                acc[k, :, c0:] += h @ pack[L][k, a:b, c0:]


def _ref_impl(codes, hidden, acc, logw, position, params, noise, given, given_mask, counts, pack, config,
              temperature):
    levels, steps = config[0], config[1]
    cnt = counts.cpu().tolist()
    t0 = int(position[0])
    for t in range(t0, t0 + steps):
        p = made_step_params(acc, logw, t, levels)
        params.copy_(p)
        two = torch.cat([torch.zeros_like(p), p], 1) if levels == 2 else p
        v = categorical_sample_ref(two, dim=1, noise=noise[t], temperature=temperature)
        if given is not None:
            v = torch.where(given_mask[:, t], given[:, t], v)
        made_step_update(codes, hidden, acc, logw, v, t, cnt, pack, config)
    position += steps


def made_sample_steps_ref(codes, hidden, acc, logw, position, params, noise, given, given_mask, counts, pack,
                          config, temperature=1.0):
    """Pure-PyTorch twin of :func:`made_sample_steps` (any device; see the module docstring)."""
    _check("made_sample_steps_ref", codes, hidden, acc, logw, position, params, noise, given, given_mask, counts,
           pack, config, temperature)
    _ref_impl(codes, hidden, acc, logw, position, params, noise, given, given_mask, counts, pack, config,
              float(temperature))


def made_sample_steps(codes, hidden, acc, logw, position, params, noise, given, given_mask, counts, pack, config,
                      temperature=1.0, check=True):
    """Run ``config[1]`` steps of the degree-bucket MADE sampler (see the module docstring); mutates codes,
    hidden, acc, logw, position and params. ``check=False`` skips the Python argument checks (a decode
    loop that checked once)."""
    if check:
        _check("made_sample_steps", codes, hidden, acc, logw, position, params, noise, given, given_mask, counts,
               pack, config, temperature)
    if _backend.use_kernel("made_sample_steps", codes.device, pack[0].dtype, KERNEL_DTYPES):
        torch.ops.fastar.made_sample_steps(codes, hidden, acc, logw, position, params, noise, given, given_mask,
                                           counts, list(pack), list(config), float(temperature))
        return
    _ref_impl(codes, hidden, acc, logw, position, params, noise, given, given_mask, counts, pack, config,
              float(temperature))


if _backend.has_ops("made_sample_steps"):

    @torch.library.register_fake("fastar::made_sample_steps")
    def _made_sample_steps_fake(codes, hidden, acc, logw, position, params, noise, given, given_mask, counts, pack,
                                config, temperature):
        return None
