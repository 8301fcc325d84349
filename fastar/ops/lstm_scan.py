"""PixelRNN's recurrences as scan ops: the skew, the Diagonal LSTM and the Row LSTM.

``skew(x)`` (B, C, H, W) -> (B, C, H, W + H - 1): row i shifted right by i (zeros elsewhere), so
the diagonals i + j = d of the image become the columns d of the skewed map (2W - 1 wide for a
square image). ``unskew(y)`` is its inverse (the zeros are dropped): (B, C, H, W' ) -> (B, C, H,
W' - H + 1). Both are differentiable (each one's backward is the other).

``diagonal_lstm_scan(is_map, w_ss, bias=None, h0=None, c0=None) -> (h, c)``, both (B, hid, H, W):
the Diagonal LSTM of PixelRNN (van den Oord et al. 2016, section 3.2). ``is_map`` (B, 4 hid, H, W)
is the input-to-state result (the caller's 1x1 mask-B convolution), gates in the order
[i | f | o | g]. The state-to-state is the 2x1 convolution of the skewed map's previous column:
in image coordinates the state at (i, j) reads the states above, (i - 1, j), and to the left,
(i, j - 1)::

    z      = is_map[:, :, i, j] + bias + w_ss[:, :, 0] @ h[i - 1, j] + w_ss[:, :, 1] @ h[i, j - 1]
    i, f, o = sigmoid(z_i), sigmoid(z_f), sigmoid(z_o);  g = tanh(z_g)
    c[i, j] = f * c[i, j - 1] + i * g;                   h[i, j] = o * tanh(c[i, j])

w_ss (4 hid, hid, 2): tap 0 multiplies the state above, tap 1 the state to the left; bias (4 hid,)
or None. The memory cell runs along the skewed map's columns, i.e. it comes from the left. The row
above row 0 is zero; the states left of column 0 are ``h0`` / ``c0`` (B, hid, H), one per row
(zeros when None). The diagonals are computed in order d = 0 .. H + W - 2, every cell of a
diagonal at once; the kernels apply the skew by index arithmetic (no skewed copy in memory).

``row_lstm_scan(is_map, w_ss, bias=None) -> (h, c)``, both (B, hid, H, W): the Row LSTM
(section 3.1). The state at (i, j) reads the previous row's states at columns j - k//2 .. j + k//2
through a width-k 1-D convolution (w_ss (4 hid, hid, k), k odd, zero padding), and the cell comes
from above::

    z       = is_map[:, :, i, j] + bias + sum_t w_ss[:, :, t] @ h[i - 1, j + t - k // 2]
    c[i, j] = f * c[i - 1, j] + i * g;     h[i, j] = o * tanh(c[i, j])

with the row above row 0 zero. Rows are computed in order, every column of a row at once.

Devices and dtypes: CPU kernels float32 / float64; CUDA kernels float32 and bfloat16 (the state
and the accumulation in float32 either way; bfloat16 outputs are rounded from it). Other dtypes
run on the references under the "auto" backend. The references accumulate half-precision inputs
in float32 too, so both paths define the same numbers.

Differentiable in is_map, w_ss, bias, h0 and c0 (double backward through the references).
"""
from __future__ import annotations

import torch

from fastar import _backend
from fastar.ops._common import check_same_device, check_tensor, no_double_backward, reference_grads

__all__ = ["skew", "skew_ref", "unskew", "unskew_ref", "diagonal_lstm_scan", "diagonal_lstm_scan_ref",
           "row_lstm_scan", "row_lstm_scan_ref"]

KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.bfloat16),
}
SKEW_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


def _acc(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---------------------------------------------------------------------------------------------- skew

def _check_skew(op, x):
    check_tensor(op, "x", x, dim=4, layout="(B, C, H, W)", floating=False)


def skew_ref(x):
    """Reference of :func:`skew`: (B, C, H, W) -> (B, C, H, W + H - 1), row i shifted right by i."""
    _check_skew("skew_ref", x)
    return _skew_def(x)


def _skew_def(x):
    b, c, h, w = x.shape
    out = x.new_zeros(b, c, h, w + h - 1)
    for i in range(h):
        out[:, :, i, i:i + w] = x[:, :, i]
    return out


def unskew_ref(y):
    """Reference of :func:`unskew`: (B, C, H, W') -> (B, C, H, W' - H + 1)."""
    _check_unskew("unskew_ref", y)
    return _unskew_def(y)


def _check_unskew(op, y):
    check_tensor(op, "y", y, dim=4, layout="(B, C, H, W + H - 1)", floating=False)
    if y.shape[3] < y.shape[2]:
        raise ValueError(f"{op}: a skewed map of {y.shape[2]} rows is at least {y.shape[2]} wide (W + H - 1 "
                         f"with W >= 1), got shape {list(y.shape)}")


def _unskew_def(y):
    b, c, h, ws = y.shape
    w = ws - h + 1
    return torch.stack([y[:, :, i, i:i + w] for i in range(h)], 2) if h else y.new_zeros(b, c, 0, w)


def skew(x):
    """(B, C, H, W) -> (B, C, H, W + H - 1): row i of x shifted right by i, zeros elsewhere. Contiguous."""
    _check_skew("skew", x)
    if _backend.use_kernel("skew", x.device, x.dtype, SKEW_DTYPES):
        return torch.ops.fastar.skew(x)
    return _skew_def(x)


def unskew(y):
    """(B, C, H, W') -> (B, C, H, W' - H + 1): the inverse of :func:`skew` (row i read from column i on)."""
    _check_unskew("unskew", y)
    if _backend.use_kernel("unskew", y.device, y.dtype, SKEW_DTYPES):
        return torch.ops.fastar.unskew(y)
    return _unskew_def(y)


# ------------------------------------------------------------------------------------ argument checks

def _check_scan(op, is_map, w_ss, bias, taps, h0=None, c0=None):
    check_tensor(op, "is_map", is_map, dim=4, layout="(B, 4 * hidden, H, W)")
    check_tensor(op, "w_ss", w_ss, dim=3, layout="(4 * hidden, hidden, taps)")
    g4, hid, k = w_ss.shape
    if hid < 1 or g4 != 4 * hid:
        raise ValueError(f"{op}: w_ss must be (4 * hidden, hidden, taps), got shape {list(w_ss.shape)}")
    if taps == "odd":
        if k % 2 == 0:
            raise ValueError(f"{op}: w_ss's state-to-state width must be odd (centred on the column), got {k}")
    elif k != taps:
        raise ValueError(f"{op}: w_ss must have {taps} taps (above, left), got shape {list(w_ss.shape)}")
    if is_map.shape[1] != g4:
        raise ValueError(f"{op}: is_map has {is_map.shape[1]} channels, w_ss needs 4 * hidden = {g4} "
                         f"(gates i | f | o | g)")
    if w_ss.dtype != is_map.dtype:
        raise TypeError(f"{op}: w_ss dtype {w_ss.dtype} must match is_map dtype {is_map.dtype}")
    if bias is not None:
        check_tensor(op, "bias", bias, dim=1, layout="(4 * hidden,)")
        if bias.shape[0] != g4:
            raise ValueError(f"{op}: bias must have length 4 * hidden = {g4}, got {bias.shape[0]}")
        if bias.dtype != is_map.dtype:
            raise TypeError(f"{op}: bias dtype {bias.dtype} must match is_map dtype {is_map.dtype}")
    b, _, h, _ = is_map.shape
    for name, s in (("h0", h0), ("c0", c0)):
        if s is None:
            continue
        check_tensor(op, name, s, dim=3, layout="(B, hidden, H)")
        if list(s.shape) != [b, hid, h]:
            raise ValueError(f"{op}: {name} must be (B, hidden, H) = {[b, hid, h]}, got {list(s.shape)}")
        if s.dtype != is_map.dtype:
            raise TypeError(f"{op}: {name} dtype {s.dtype} must match is_map dtype {is_map.dtype}")
    check_same_device(op, is_map=is_map, w_ss=w_ss, bias=bias, h0=h0, c0=c0)


def _cell(z, c_prev, hid):
    gi, gf, go, gg = z.split(hid, 1)
    c = torch.sigmoid(gf) * c_prev + torch.sigmoid(gi) * torch.tanh(gg)
    return torch.sigmoid(go) * torch.tanh(c), c


# ------------------------------------------------------------------------------------ Diagonal LSTM

def _diagonal_def(is_map, w_ss, bias, h0, c0):
    """The Diagonal LSTM, one skewed column (diagonal) at a time, every row of it in one matmul.

    As fast as plain PyTorch reasonably gets: the input-to-state map is skewed once, each column
    is one (4h, 2h) @ (2h, B*H) product of [state above | state left], and cells outside the
    image (left of a row's start) keep that row's h0/c0, so they never feed a real cell.
    """
    out_dtype = is_map.dtype
    acc = _acc(out_dtype)
    b, g4, H, W = is_map.shape
    hid = g4 // 4
    if is_map.numel() == 0:                                            # an empty map: empty states, as the kernels
        e = is_map.new_zeros(b, hid, H, W) + sum(t.sum() for t in (is_map, w_ss, bias, h0, c0) if t is not None) * 0
        return e, e.clone()
    x = _skew_def(is_map.to(acc))                                      # (B, 4h, H, W + H - 1)
    w = torch.cat([w_ss[:, :, 0], w_ss[:, :, 1]], 1).to(acc)          # (4h, 2h): [above | left]
    if bias is not None:
        x = x + bias.to(acc).view(1, g4, 1, 1)
    hp = h0.to(acc) if h0 is not None else is_map.new_zeros(b, hid, H, dtype=acc)
    cp = c0.to(acc) if c0 is not None else is_map.new_zeros(b, hid, H, dtype=acc)
    rows = torch.arange(H, device=is_map.device)
    hs, cs = [], []
    zero_row = is_map.new_zeros(b, hid, 1, dtype=acc)
    for s in range(W + H - 1):
        up = torch.cat([zero_row, hp[:, :, :-1]], 2)                   # row i reads row i - 1's latest state
        z = x[:, :, :, s] + torch.einsum("gk,bkr->bgr", w, torch.cat([up, hp], 1))
        hn, cn = _cell(z, cp, hid)
        valid = ((rows <= s) & (rows > s - W)).view(1, 1, H)
        hp, cp = torch.where(valid, hn, hp), torch.where(valid, cn, cp)
        hs.append(torch.where(valid, hn, 0.0))
        cs.append(torch.where(valid, cn, 0.0))
    h = _unskew_def(torch.stack(hs, 3)).to(out_dtype)
    c = _unskew_def(torch.stack(cs, 3)).to(out_dtype)
    return h, c


def diagonal_lstm_scan_ref(is_map, w_ss, bias=None, h0=None, c0=None):
    """Reference of :func:`diagonal_lstm_scan` (plain PyTorch, a loop over the diagonals)."""
    _check_scan("diagonal_lstm_scan_ref", is_map, w_ss, bias, 2, h0, c0)
    return _diagonal_def(is_map, w_ss, bias, h0, c0)


def diagonal_lstm_scan(is_map, w_ss, bias=None, h0=None, c0=None):
    """The Diagonal LSTM over an image: (h, c), both (B, hidden, H, W). See the module docstring.

    is_map: (B, 4 hidden, H, W) input-to-state pre-activations, gates [i | f | o | g]; w_ss:
    (4 hidden, hidden, 2), taps [above, left]; bias: (4 hidden,) or None; h0, c0: (B, hidden, H)
    states left of column 0, or None (zeros). Runs the compiled kernel or the reference according
    to :func:`fastar.set_backend`.
    """
    _check_scan("diagonal_lstm_scan", is_map, w_ss, bias, 2, h0, c0)
    if _backend.use_kernel("diagonal_lstm_scan", is_map.device, is_map.dtype, KERNEL_DTYPES):
        h, c, _ = torch.ops.fastar.diagonal_lstm_scan(is_map, w_ss, bias, h0, c0)
        return h, c
    return _diagonal_def(is_map, w_ss, bias, h0, c0)


# ---------------------------------------------------------------------------------------- Row LSTM

def _row_def(is_map, w_ss, bias):
    """The Row LSTM, one row at a time: the state-to-state is one conv1d over the previous row."""
    out_dtype = is_map.dtype
    acc = _acc(out_dtype)
    b, g4, H, W = is_map.shape
    hid, k = g4 // 4, w_ss.shape[2]
    x = is_map.to(acc)
    if bias is not None:
        x = x + bias.to(acc).view(1, g4, 1, 1)
    w = w_ss.to(acc)
    if is_map.numel() == 0:                                            # an empty map: empty states, as the kernels
        e = is_map.new_zeros(b, hid, H, W) + sum(t.sum() for t in (is_map, w_ss, bias) if t is not None) * 0
        return e, e.clone()
    cp = is_map.new_zeros(b, hid, W, dtype=acc)
    hs, cs = [], []
    for i in range(H):
        # Row 0 has no row above: no state term at all (not w_ss @ 0, which an inf or NaN in w_ss would
        # turn into NaN), as in the kernels.
        # (w.narrow(0, 0, 0).sum() is an exact 0 that keeps w in the graph: its gradient is then zeros
        # for a one-row image, not "unused".)
        z = x[:, :, i] + w.narrow(0, 0, 0).sum() if i == 0 else \
            x[:, :, i] + torch.nn.functional.conv1d(hp, w, padding=k // 2)
        hp, cp = _cell(z, cp, hid)
        hs.append(hp)
        cs.append(cp)
    return torch.stack(hs, 2).to(out_dtype), torch.stack(cs, 2).to(out_dtype)


def row_lstm_scan_ref(is_map, w_ss, bias=None):
    """Reference of :func:`row_lstm_scan` (plain PyTorch, a loop over the rows)."""
    _check_scan("row_lstm_scan_ref", is_map, w_ss, bias, "odd")
    return _row_def(is_map, w_ss, bias)


def row_lstm_scan(is_map, w_ss, bias=None):
    """The Row LSTM over an image: (h, c), both (B, hidden, H, W). See the module docstring.

    is_map: (B, 4 hidden, H, W), gates [i | f | o | g]; w_ss: (4 hidden, hidden, k), k odd, the
    width-k convolution over the previous row's states; bias: (4 hidden,) or None.
    """
    _check_scan("row_lstm_scan", is_map, w_ss, bias, "odd")
    if _backend.use_kernel("row_lstm_scan", is_map.device, is_map.dtype, KERNEL_DTYPES):
        # No gradient wanted (inference, sampling): the kernel keeps no activations for a backward.
        save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (is_map, w_ss, bias))
        h, c, _ = torch.ops.fastar.row_lstm_scan(is_map, w_ss, bias, save)
        return h, c
    return _row_def(is_map, w_ss, bias)


# ------------------------------------------------------------------------------- op registrations

if _backend.has_ops("skew", "unskew"):

    @torch.library.register_fake("fastar::skew")
    def _skew_fake(x):
        b, c, h, w = x.shape
        return x.new_empty(b, c, h, w + h - 1)

    @torch.library.register_fake("fastar::unskew")
    def _unskew_fake(y):
        b, c, h, ws = y.shape
        return y.new_empty(b, c, h, ws - h + 1)

    torch.library.register_autograd("fastar::skew", lambda ctx, g: torch.ops.fastar.unskew(g),
                                    setup_context=lambda ctx, inputs, output: None)
    torch.library.register_autograd("fastar::unskew", lambda ctx, g: torch.ops.fastar.skew(g),
                                    setup_context=lambda ctx, inputs, output: None)


def _register_scan(name, n_state, ref_fn):
    """Fake kernels and autograd of a scan op ``name(is_map, w_ss, bias, *states) -> (h, c, saved)``
    (saved: (B, 5 hidden, H, W) in the accumulation dtype, the activations [i | f | o | g] and the
    cell c, kept for the backward) whose backward op is ``name_backward(grad_h, grad_c, is_map, w_ss, h, c, gates, *states,
    output_mask) -> (d_is, d_w, d_bias, *d_states)``."""

    def _fake(is_map, w_ss, bias, *rest):
        b, g4, h, w = is_map.shape
        hid = g4 // 4
        out = is_map.new_empty(b, hid, h, w)
        save = rest[n_state] if len(rest) > n_state else True
        saved = is_map.new_empty(b, 5 * hid, h, w, dtype=_acc(is_map.dtype)) if save else \
            is_map.new_empty(0, dtype=_acc(is_map.dtype))
        return out, is_map.new_empty(b, hid, h, w), saved

    torch.library.register_fake(f"fastar::{name}")(_fake)

    def _bwd_fake(grad_h, grad_c, is_map, w_ss, h, c, gates, *rest):
        states, mask = rest[:-1], rest[-1]
        e = is_map.new_empty(0)
        outs = [is_map.new_empty(is_map.shape) if mask[0] else e,
                w_ss.new_empty(w_ss.shape) if mask[1] else e,
                w_ss.new_empty(w_ss.shape[0]) if mask[2] else e]
        for k in range(n_state):
            outs.append(is_map.new_empty(h.shape[0], h.shape[1], h.shape[2]) if mask[3 + k] else e)
        return tuple(outs)

    torch.library.register_fake(f"fastar::{name}_backward")(_bwd_fake)

    def _setup(ctx, inputs, output):
        is_map, w_ss, bias, *states = inputs
        ctx.n_flags = len(states) - n_state               # the Row LSTM's trailing `save`
        states = states[:n_state]
        h, c, gates = output
        # The saved activations are the backward's working memory, not a result: no gradient flows
        # through them (a loss on them would otherwise get a silent zero), so they do not require grad.
        ctx.mark_non_differentiable(gates)
        ctx.has_bias = bias is not None
        ctx.has_state = [s is not None for s in states]
        ctx.save_for_backward(is_map, w_ss, bias, h, c, gates, *states)

    def _backward(ctx, gh, gc, _ggates):
        is_map, w_ss, bias, h, c, gates, *states = ctx.saved_tensors
        if gates.numel() == 0 and h.numel() != 0:
            raise RuntimeError(f"fastar::{name} was called with save=False, so it kept nothing to differentiate; "
                               "call it with save=True (the public function does whenever a gradient is wanted)")
        need = list(ctx.needs_input_grad[:3 + n_state])
        need[2] = need[2] and ctx.has_bias
        for k in range(n_state):
            need[3 + k] = need[3 + k] and ctx.has_state[k]
        gh = torch.zeros_like(h) if gh is None else gh
        gc = torch.zeros_like(c) if gc is None else gc
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the reference (same values, a graph to walk again).
            grads = reference_grads(lambda *a: torch.cat([t.flatten() for t in ref_fn(*a)]),
                                    (is_map, w_ss, bias, *states), need, torch.cat([gh.flatten(), gc.flatten()]))
            return tuple(grads) + (None,) * ctx.n_flags
        res = getattr(torch.ops.fastar, f"{name}_backward")(
            gh.contiguous(), gc.contiguous(), is_map, w_ss, h, c, gates, *states, need)
        return tuple(r if n else None for r, n in zip(res, need)) + (None,) * ctx.n_flags

    torch.library.register_autograd(f"fastar::{name}", _backward, setup_context=_setup)
    torch.library.register_autograd(f"fastar::{name}_backward", no_double_backward(f"{name}_backward"),
                                    setup_context=lambda ctx, inputs, output: None)


if _backend.has_ops("diagonal_lstm_scan", "diagonal_lstm_scan_backward"):
    _register_scan("diagonal_lstm_scan", 2, _diagonal_def)
if _backend.has_ops("row_lstm_scan", "row_lstm_scan_backward"):
    _register_scan("row_lstm_scan", 0, _row_def)
