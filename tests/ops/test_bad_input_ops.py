"""Bad input, one table: every row is (public op, what is wrong, a call building that input) and is run
against the public function AND its ``_ref`` twin, both of which must raise a clear error (one naming
the op) -- the twin checks what the kernel checks. The next op family adds its rows here.

A row's call takes the function under test; ``ERR`` is what any clear refusal may be (Python checks
raise ValueError/TypeError, kernel TORCH_CHECKs RuntimeError).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch

import fastar.ops as ops
from tests.ops.test_wavenet_step import _call as _wn_call
from tests.ops.test_wavenet_step import _clone as _wn_clone
from tests.ops.test_pixel_step import _args as _gps_args
from tests.ops.test_wavenet_step import _step_case
from tests.ops.test_pixelrnn_step import BAD as _RNN_BAD

ERR = (ValueError, TypeError, RuntimeError)
NAN, INF = float("nan"), float("inf")


class Row(NamedTuple):
    op: str            # public name; the twin is op + "_ref"
    what: str          # the bad input, in words (the test id)
    call: Callable     # call(fn) -> calls fn with the bad input
    match: str         # a regex the error message must contain


def _conv(x=None, w=None, b=None, m=None, padding=None, dilation=1):
    x = torch.zeros(1, 2, 5, 5) if x is None else x
    w = torch.zeros(3, 2, 3, 3) if w is None else w
    m = torch.ones(3, 2, 3, 3) if m is None else m
    return lambda f: f(x, w, b, m, padding, dilation)


def _at(pos=None, x_new=None, cache=None, w=None):
    cache = torch.zeros(1, 2, 5, 5) if cache is None else cache
    w = torch.zeros(3, 2, 3, 3) if w is None else w
    pos = torch.tensor([[1, 1]]) if pos is None else pos
    return lambda f: f(cache.clone(), x_new, w, None, torch.ones_like(w), pos)


def _cat(logits=None, **kw):
    logits = torch.zeros(4, 5) if logits is None else logits
    return lambda f: f(logits, **kw)


def _nll(x=None, p=None, k=2, **kw):
    x = torch.zeros(2, 3, 4, 4) if x is None else x
    p = torch.zeros(2, 20, 4, 4) if p is None else p
    return lambda f: f(x, p, k, **kw)


def _val(p=None, prev=None, k=2, j=1, num_bits=8):
    p = torch.zeros(3, 20) if p is None else p
    prev = torch.zeros(3, 1) if prev is None else prev
    return lambda f: f(p, prev, k, j, num_bits)


def _smp(p=None, k=2, **kw):
    p = torch.zeros(2, 20, 4, 4) if p is None else p
    return lambda f: f(p, k, **kw)


def _upd(x=None, state=None, w=None, b=None, dilation=1, position=0):
    x = torch.zeros(2, 3) if x is None else x
    state = torch.zeros(2, 3, 2) if state is None else state
    w = torch.zeros(4, 3, 3) if w is None else w
    return lambda f: f(x, state, w, b, dilation, position)


def _wn(noise=None, temperature=1.0, position=None):
    def call(f):
        st, c, w, dil = _step_case("cpu", torch.float32, B=2, T=6)
        st = _wn_clone(st)
        if noise is not None:
            st["noise"] = noise(st["noise"])
        if position is not None:
            st["position"] = position
        return _wn_call(f, st, c, w, dil, temperature=temperature)
    return call


def _set(t, idx, v):
    t = t.clone()
    t[idx] = v
    return t


# gated_pixelcnn_step's 24 named arguments, from a tiny conditional model with a prefix (test_pixel_step's
# fixture): index -> the argument to replace.
_GPS = dict(noise=5, step=3, logits=4, taps=20, levels=22, temperature=23)


def _gps(**bad):
    def call(f):
        args = _gps_args("cpu")
        for k, v in bad.items():
            args[_GPS[k]] = v(args[_GPS[k]]) if callable(v) else v
        return f(*args)
    return call


def _ppp(maps=None, program=None, i=0, j=0, out=None):
    """pixelcnnpp_ul_step: one OUT instruction over a 1-map, 1x2 image."""
    m = torch.zeros(2, 3, 2, 4) if maps is None else maps
    w, b = torch.zeros(3, 5), torch.zeros(5)
    prog = [4, 0, -1, 0, -1, -1, -1, 0, 1, -1, -1, -1, -1, -1] if program is None else program
    o = torch.zeros(2, 5) if out is None else out
    return lambda f: f([m], [w, b], prog, i, j, o)


def _scan(x=None, w=None, b=None, h0=None, k=2):
    x = torch.zeros(2, 8, 3, 4) if x is None else x
    w = torch.zeros(8, 2, k) if w is None else w
    return (lambda f: f(x, w, b, h0)) if k == 2 else (lambda f: f(x, w, b))


ROWS = [
    # masked_conv2d
    Row("masked_conv2d", "x 3-D", _conv(x=torch.zeros(2, 5, 5)), "x must be 4-D"),
    Row("masked_conv2d", "weight 2-D", _conv(w=torch.zeros(3, 3), m=torch.ones(3, 3)), "weight must be 4-D"),
    Row("masked_conv2d", "mask shape", _conv(m=torch.ones(3, 2, 3, 2)), "mask must have the weight's shape"),
    Row("masked_conv2d", "int mask", _conv(m=torch.ones(3, 2, 3, 3, dtype=torch.int32)), "mask must be bool"),
    Row("masked_conv2d", "int x", _conv(x=torch.zeros(1, 2, 5, 5, dtype=torch.int64)), "floating-point"),
    Row("masked_conv2d", "weight dtype", _conv(w=torch.zeros(3, 2, 3, 3, dtype=torch.float64)), "must match x dtype"),
    Row("masked_conv2d", "channels", _conv(x=torch.zeros(1, 4, 5, 5)), "input channels"),
    Row("masked_conv2d", "bias length", _conv(b=torch.zeros(2)), "bias must have length 3"),
    Row("masked_conv2d", "dilation 0", _conv(dilation=0), "dilation must be at least 1"),
    Row("masked_conv2d", "float dilation", _conv(dilation=1.5), "dilation must be an int"),
    Row("masked_conv2d", "absurd dilation", _conv(dilation=2 ** 40), "dilation .* beyond"),
    Row("masked_conv2d", "absurd padding", _conv(padding=2 ** 33), "padding .* beyond"),
    Row("masked_conv2d", "negative padding", _conv(padding=-1), "padding must be non-negative"),
    Row("masked_conv2d", "kernel too big", _conv(padding=0, dilation=3), "does not fit"),
    Row("masked_conv2d", "device mix", _conv(w=torch.zeros(3, 2, 3, 3, device="meta")), "one device"),
    # masked_conv2d_at
    Row("masked_conv2d_at", "int32 pos", _at(pos=torch.tensor([[1, 1]], dtype=torch.int32)), "pos must be int64"),
    Row("masked_conv2d_at", "pos shape", _at(pos=torch.tensor([1, 1, 1])), r"pos must be \(P, 2\)"),
    Row("masked_conv2d_at", "negative pos", _at(pos=torch.tensor([[-1, 2]])), "lies outside"),
    Row("masked_conv2d_at", "pos past the map", _at(pos=torch.tensor([[2, 5]])), "lies outside"),
    Row("masked_conv2d_at", "x_new shape", _at(x_new=torch.zeros(1, 2, 2)), "x_new must be"),
    Row("masked_conv2d_at", "x_new dtype", _at(x_new=torch.zeros(1, 2, 1, dtype=torch.float64)), "x_new dtype"),
    Row("masked_conv2d_at", "cache 3-D", _at(cache=torch.zeros(2, 5, 5)), "x_cache must be 4-D"),
    # categorical_sample
    Row("categorical_sample", "int logits", _cat(torch.zeros(4, 5, dtype=torch.int64)), "floating-point"),
    Row("categorical_sample", "scalar logits", _cat(torch.tensor(1.0)), "at least 1 dimension"),
    Row("categorical_sample", "float dim", _cat(dim=1.0), "dim must be an int"),
    Row("categorical_sample", "dim out of range", _cat(dim=2), "out of range"),
    Row("categorical_sample", "no categories", _cat(torch.zeros(4, 0)), "at least one category"),
    Row("categorical_sample", "nan temperature", _cat(temperature=NAN), "temperature must be"),
    Row("categorical_sample", "inf temperature", _cat(temperature=INF), "temperature must be"),
    Row("categorical_sample", "negative temperature", _cat(temperature=-1.0), "temperature must be"),
    Row("categorical_sample", "top_k 0", _cat(top_k=0), "top_k must be"),
    Row("categorical_sample", "top_k float", _cat(top_k=2.0), "top_k must be"),
    Row("categorical_sample", "noise shape", _cat(noise=torch.rand(5)), "noise must have shape"),
    Row("categorical_sample", "int noise", _cat(noise=torch.zeros(4, dtype=torch.int64)), "noise must be"),
    Row("categorical_sample", "nan noise", _cat(noise=_set(torch.rand(4), 1, NAN)), r"uniforms in \[0, 1\)"),
    Row("categorical_sample", "noise 1.0", _cat(noise=_set(torch.rand(4), 2, 1.0)), r"uniforms in \[0, 1\)"),
    Row("categorical_sample", "negative noise", _cat(noise=_set(torch.rand(4), 0, -0.1)), r"uniforms in \[0, 1\)"),
    Row("categorical_sample", "noise device", _cat(noise=torch.rand(4, device="meta")), "noise is on"),
    # discretized_mix_logistic_nll
    Row("discretized_mix_logistic_nll", "x outside [-1, 1]", _nll(x=torch.full((2, 3, 4, 4), 2.0)), r"\[-1, 1\]"),
    Row("discretized_mix_logistic_nll", "wrong P", _nll(p=torch.zeros(2, 21, 4, 4)), "params has 21 channels"),
    Row("discretized_mix_logistic_nll", "num_mixtures 0", _nll(k=0), "num_mixtures must be"),
    Row("discretized_mix_logistic_nll", "float num_mixtures", _nll(k=2.0), "num_mixtures must be"),
    Row("discretized_mix_logistic_nll", "num_bits 17", _nll(num_bits=17), "num_bits must be"),
    Row("discretized_mix_logistic_nll", "reduction", _nll(reduction="max"), "reduction must be"),
    Row("discretized_mix_logistic_nll", "x channels", _nll(x=torch.zeros(2, 1, 4, 4)), "x has 1 channels"),
    Row("discretized_mix_logistic_nll", "x size", _nll(x=torch.zeros(2, 3, 4, 5)), "does not match"),
    Row("discretized_mix_logistic_nll", "params 5-D", _nll(p=torch.zeros(2, 20, 4, 4, 1)), "params must be 4-D"),
    Row("discretized_mix_logistic_nll", "int params", _nll(p=torch.zeros(2, 20, 4, 4, dtype=torch.int64)),
        "floating-point"),
    Row("discretized_mix_logistic_nll", "audio x 3-D", _nll(x=torch.zeros(2, 1, 5), p=torch.zeros(2, 6, 5)),
        "x must be 2-D"),
    Row("discretized_mix_logistic_nll", "device mix", _nll(x=torch.zeros(2, 3, 4, 4, device="meta")), "one device"),
    # sample_discretized_mix_logistic
    Row("sample_discretized_mix_logistic", "params 2-D", _smp(p=torch.zeros(2, 20)), "params must be 4-D"),
    Row("sample_discretized_mix_logistic", "noise shape", _smp(noise=torch.rand(2, 3, 4, 4)), "noise must have shape"),
    Row("sample_discretized_mix_logistic", "nan noise", _smp(noise=_set(torch.rand(2, 4, 4, 4), (0, 1, 2, 2), NAN)),
        r"uniforms in \[0, 1\)"),
    Row("sample_discretized_mix_logistic", "noise 1.0", _smp(noise=_set(torch.rand(2, 4, 4, 4), (1, 0, 0, 0), 1.0)),
        r"uniforms in \[0, 1\)"),
    Row("sample_discretized_mix_logistic", "nan temperature", _smp(temperature=NAN), "temperature must be"),
    Row("sample_discretized_mix_logistic", "bool temperature", _smp(temperature=True), "temperature must be"),
    Row("sample_discretized_mix_logistic", "num_bits 0", _smp(num_bits=0), "num_bits must be"),
    Row("sample_discretized_mix_logistic", "int noise", _smp(noise=torch.zeros(2, 4, 4, 4, dtype=torch.int64)),
        "noise must be"),
    # dml_value_log_probs
    Row("dml_value_log_probs", "params 3-D", _val(p=torch.zeros(3, 20, 1)), "params must be 2-D"),
    Row("dml_value_log_probs", "params for another K", _val(k=3), "needs 3K"),
    Row("dml_value_log_probs", "j past the colours", _val(j=3, prev=torch.zeros(3, 3)), "colour index"),
    Row("dml_value_log_probs", "prev shape", _val(prev=torch.zeros(3, 2)), "prev must have shape"),
    Row("dml_value_log_probs", "prev dtype", _val(prev=torch.zeros(3, 1, dtype=torch.float64)), "prev must be"),
    Row("dml_value_log_probs", "num_bits 17", _val(num_bits=17), "num_bits"),
    # causal_conv1d_update
    Row("causal_conv1d_update", "state shape", _upd(state=torch.zeros(2, 3, 3)), "state must have shape"),
    Row("causal_conv1d_update", "dilation 0", _upd(dilation=0), "dilation must be a positive int"),
    Row("causal_conv1d_update", "float dilation", _upd(dilation=1.0), "dilation must be a positive int"),
    Row("causal_conv1d_update", "negative position", _upd(position=-1), "non-negative"),
    Row("causal_conv1d_update", "negative tensor position", _upd(position=torch.tensor([-3])), "non-negative"),
    Row("causal_conv1d_update", "float position", _upd(position=1.5), "position must be"),
    Row("causal_conv1d_update", "int32 position", _upd(position=torch.tensor([1], dtype=torch.int32)),
        "position must be"),
    Row("causal_conv1d_update", "channels", _upd(w=torch.zeros(4, 2, 3)), "channels but weight expects"),
    Row("causal_conv1d_update", "dtype mix", _upd(state=torch.zeros(2, 3, 2, dtype=torch.float64)), "must match"),
    Row("causal_conv1d_update", "bias length", _upd(b=torch.zeros(3)), "bias must have length"),
    # wavenet_step (a small softmax-head model; its own file holds the shape rows)
    Row("wavenet_step", "nan noise", _wn(noise=lambda u: _set(u, (1, 0), NAN)), r"uniforms in \[0, 1\)"),
    Row("wavenet_step", "noise 1.0", _wn(noise=lambda u: _set(u, (0, 0), 1.0)), r"uniforms in \[0, 1\)"),
    Row("wavenet_step", "nan temperature", _wn(temperature=NAN), "temperature must be"),
    Row("wavenet_step", "int32 position", _wn(position=torch.zeros(1, dtype=torch.int32)), "position must be"),
    # gated_pixelcnn_step
    Row("gated_pixelcnn_step", "nan noise", _gps(noise=lambda u: _set(u, (0, 0), NAN)), r"uniforms in \[0, 1\)"),
    Row("gated_pixelcnn_step", "noise 1.0", _gps(noise=lambda u: _set(u, (0, 1), 1.0)), r"uniforms in \[0, 1\)"),
    Row("gated_pixelcnn_step", "nan temperature", _gps(temperature=NAN), "temperature"),
    Row("gated_pixelcnn_step", "negative temperature", _gps(temperature=-1.0), "temperature"),
    Row("gated_pixelcnn_step", "int32 step", _gps(step=lambda s: s.to(torch.int32)), "step"),
    Row("gated_pixelcnn_step", "logits shape", _gps(logits=lambda lg: lg[:, :1].contiguous()), "logits"),
    Row("gated_pixelcnn_step", "levels 1", _gps(levels=1), "levels"),
    # skew / unskew / the PixelRNN scans (tests/ops/test_lstm_scan.py holds the rest)
    Row("skew", "x 3-D", lambda f: f(torch.zeros(2, 3, 4)), "x must be 4-D"),
    Row("unskew", "too narrow", lambda f: f(torch.zeros(1, 2, 5, 4)), "at least 5 wide"),
    Row("diagonal_lstm_scan", "channels", _scan(x=torch.zeros(2, 4, 3, 4)), "is_map has 4 channels"),
    Row("diagonal_lstm_scan", "three taps", _scan(w=torch.zeros(8, 2, 3)), "must have 2 taps"),
    Row("diagonal_lstm_scan", "h0 shape", _scan(h0=torch.zeros(2, 2, 4)), r"h0 must be \(B, hidden, H\)"),
    Row("diagonal_lstm_scan", "dtype mix", _scan(b=torch.zeros(8, dtype=torch.float64)), "bias dtype"),
    Row("row_lstm_scan", "even width", _scan(k=4), "must be odd"),
    Row("row_lstm_scan", "is_map 3-D", _scan(x=torch.zeros(8, 3, 4), k=3), "is_map must be 4-D"),
    Row("pixelcnnpp_ul_step", "program length", _ppp(program=[4, 0, 0]), "14 per instruction"),
    Row("pixelcnnpp_ul_step", "unknown kind", _ppp(program=[9] + [0] * 13), "unknown kind"),
    Row("pixelcnnpp_ul_step", "map index", _ppp(program=[4, 0, -1, 3, -1, -1, -1, 0, 1, -1, -1, -1, -1, -1]),
        "out of range"),
    Row("pixelcnnpp_ul_step", "position", _ppp(j=2), r"position \(0, 2\) is outside the 1x2 image"),
    Row("pixelcnnpp_ul_step", "out batch", _ppp(out=torch.zeros(3, 5)), r"out must be a contiguous \(N, P\)"),
    Row("pixelcnnpp_ul_step", "int maps", _ppp(maps=torch.zeros(2, 3, 2, 4, dtype=torch.int64)), "float32 or float64"),
] + [Row("pixelrnn_step", what, call, "pixelrnn_step") for what, call in _RNN_BAD]


@pytest.mark.parametrize("twin", ["", "_ref"], ids=["public", "ref"])
@pytest.mark.parametrize("row", ROWS, ids=[f"{r.op}-{r.what}" for r in ROWS])
def test_bad_input_is_a_clear_error(row, twin):
    fn = getattr(ops, row.op + twin)
    with pytest.raises(ERR, match=row.match):
        row.call(fn)


def test_every_public_op_has_rows():
    public = {n for n in ops.__all__ if not n.endswith("_ref") and n + "_ref" in ops.__all__}
    covered = {r.op for r in ROWS}
    assert public <= covered, public - covered


# Odd but legal input: kernel and twin give the same answer (NaN where one gives NaN), never a crash
# from torch internals in one of them. (op, what, call(fn) -> outputs). The next op family adds rows.
def _scan_legal(shape=(2, 8, 3, 4), k=2, w_fill=None, grad=False):
    def call(fn):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=grad)
        w = torch.randn(8, 2, k, generator=g, dtype=torch.float64)
        if w_fill is not None:
            w[0, 1, 0] = w_fill
        w.requires_grad_(grad)
        h, c = fn(x, w)
        if not grad:
            return [h, c]
        gx, gw = torch.autograd.grad((h.sum() + c.sum()), (x, w))
        return [h.detach(), c.detach(), gx, gw]
    return call


LEGAL = [(op, f"{what}{' grad' if grad else ''}", _scan_legal(shape, k, fill, grad))
         for op, k in (("diagonal_lstm_scan", 2), ("row_lstm_scan", 3))
         for what, shape, fill in (("empty batch", (0, 8, 3, 4), None), ("no rows", (2, 8, 0, 4), None),
                                   ("no columns", (2, 8, 3, 0), None), ("inf in w_ss", (2, 8, 3, 4), INF),
                                   ("-inf in w_ss", (2, 8, 3, 4), -INF), ("NaN in w_ss", (2, 8, 3, 4), NAN))
         for grad in (False, True)] + [
    ("skew", "no rows", lambda f: [f(torch.zeros(2, 3, 0, 4))]),
    ("skew", "empty batch", lambda f: [f(torch.zeros(0, 3, 2, 4))]),
    ("unskew", "no rows", lambda f: [f(torch.zeros(2, 3, 0, 4))]),
]


@pytest.mark.parametrize("op,what,call", LEGAL, ids=[f"{r[0]}-{r[1]}" for r in LEGAL])
def test_odd_legal_input_same_answer_as_the_twin(op, what, call):
    got, want = call(getattr(ops, op)), call(getattr(ops, op + "_ref"))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert torch.equal(torch.isnan(a), torch.isnan(b)), (what, a, b)
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("op,k", [("diagonal_lstm_scan", 2), ("row_lstm_scan", 3)])
def test_saved_output_of_the_raw_scan_ops_takes_no_gradient(op, k):
    """The raw ops' third output (the activations kept for the backward) was differentiable in name
    only: a loss on it got a silent zero gradient. It is marked non-differentiable now."""
    from fastar import _backend

    if not _backend.has_ops(op):
        pytest.skip("no compiled scan ops")
    x = torch.randn(1, 8, 3, 4, requires_grad=True)
    h, c, saved = getattr(torch.ops.fastar, op)(x, torch.randn(8, 2, k), None, *([None, None] if k == 2 else []))
    assert h.requires_grad and not saved.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        saved.sum().backward()
