"""Dilated causal queue ops: causal_conv1d_update and wavenet_step, kernels against references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastar
from fastar.ops.wavenet import (WaveNetWeights, causal_conv1d_update, causal_conv1d_update_ref, queue_sizes,
                                wavenet_op_args, wavenet_step, wavenet_step_ref)
from tests.conftest import requires_kernel, tol


# ---------------------------------------------------------------------------------------------
# causal_conv1d_update


def _conv_case(device, dtype, B, C_in, C_out, k, d, T, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(B, C_in, T, generator=g, dtype=torch.float64).to(device, dtype)
    w = torch.randn(C_out, C_in, k, generator=g, dtype=torch.float64).to(device, dtype)
    b = torch.randn(C_out, generator=g, dtype=torch.float64).to(device, dtype) if bias else None
    return xs, w, b


def _full_conv(xs, w, b, d):
    k = w.shape[-1]
    return F.conv1d(F.pad(xs, ((k - 1) * d, 0)), w, b, dilation=d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,C_in,C_out,k,d", [(1, 3, 5, 2, 1), (4, 8, 6, 2, 4), (3, 5, 7, 3, 2), (2, 4, 4, 1, 1),
                                               (5, 16, 3, 4, 3)])
def test_causal_conv1d_update_matches_full_conv(device, dtype, B, C_in, C_out, k, d):
    requires_kernel("causal_conv1d_update", device)
    T = 11
    xs, w, b = _conv_case(device, dtype, B, C_in, C_out, k, d, T)
    want = _full_conv(xs, w, b, d)
    s_ker = torch.zeros(B, C_in, (k - 1) * d, device=device, dtype=dtype)
    s_ref = s_ker.clone()
    for t in range(T):
        with fastar.backend("kernel"):
            yk = causal_conv1d_update(xs[:, :, t], s_ker, w, b, d, t)
        yr = causal_conv1d_update_ref(xs[:, :, t], s_ref, w, b, d, torch.tensor(t, device=device))
        torch.testing.assert_close(yk, want[:, :, t], **tol(dtype))
        torch.testing.assert_close(yr, want[:, :, t], **tol(dtype))
    torch.testing.assert_close(s_ker, s_ref, rtol=0, atol=0)


def test_causal_conv1d_update_noncontiguous_and_no_bias(device):
    requires_kernel("causal_conv1d_update", device)
    B, C, k, d, T = 3, 6, 3, 2, 9
    xs, w, _ = _conv_case(device, torch.float64, B, C, C, k, d, T, bias=False)
    w_nc = w.transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    assert not w_nc.is_contiguous()
    x_nc = xs.transpose(1, 2).contiguous().transpose(1, 2)  # time-major storage: x[:, :, t] is strided
    want = _full_conv(xs, w, None, d)
    state = torch.zeros(B, C, (k - 1) * d, device=device, dtype=torch.float64)
    for t in range(T):
        with fastar.backend("kernel"):
            y = causal_conv1d_update(x_nc[:, :, t], state, w_nc, None, d, t)
        torch.testing.assert_close(y, want[:, :, t], **tol(torch.float64))


def test_causal_conv1d_update_opcheck(device):
    requires_kernel("causal_conv1d_update", device)
    xs, w, b = _conv_case(device, torch.float32, 2, 4, 3, 2, 2, 3)
    state = torch.randn(2, 4, 2, device=device)
    pos = torch.tensor([5], device=device)
    torch.library.opcheck(torch.ops.fastar.causal_conv1d_update.default, (xs[:, :, 0], state, w, b, 2, pos))
    torch.library.opcheck(torch.ops.fastar.causal_conv1d_update.default, (xs[:, :, 0], state, w, None, 2, pos))


def test_causal_conv1d_update_compiles(device):
    requires_kernel("causal_conv1d_update", device)
    xs, w, b = _conv_case(device, torch.float32, 2, 4, 3, 3, 2, 6)
    want = _full_conv(xs, w, b, 2)

    @torch.compile(fullgraph=True)
    def step(x, state, pos):
        return causal_conv1d_update(x, state, w, b, 2, pos)

    state = torch.zeros(2, 4, 4, device=device)
    for t in range(6):
        y = step(xs[:, :, t].contiguous(), state, torch.tensor([t], device=device))
        torch.testing.assert_close(y, want[:, :, t], **tol(torch.float32))


def test_causal_conv1d_update_bad_input():
    x = torch.randn(2, 4)
    w = torch.randn(3, 4, 2)
    with pytest.raises(ValueError, match=r"state must have shape \[2, 4, 3\]"):
        causal_conv1d_update(x, torch.zeros(2, 4, 2), w, None, 3, 0)  # wrong size for dilation 3
    with pytest.raises(ValueError, match="state must have shape"):
        causal_conv1d_update(x, torch.zeros(5, 4, 3), w, None, 3, 0)  # batch mismatch
    with pytest.raises(ValueError, match="x has 4 channels but weight expects 5"):
        causal_conv1d_update(x, torch.zeros(2, 4, 3), torch.randn(3, 5, 2), None, 3, 0)
    with pytest.raises(ValueError, match="dilation must be a positive int"):
        causal_conv1d_update(x, torch.zeros(2, 4, 0), w, None, 0, 0)
    with pytest.raises(TypeError, match="dtype"):
        causal_conv1d_update(x, torch.zeros(2, 4, 3, dtype=torch.float64), w, None, 3, 0)
    with pytest.raises(ValueError, match="bias must have length 3"):
        causal_conv1d_update(x, torch.zeros(2, 4, 3), w, torch.zeros(4), 3, 0)
    with pytest.raises(ValueError, match="position must be non-negative"):
        causal_conv1d_update(x, torch.zeros(2, 4, 3), w, None, 3, -1)
    with pytest.raises(TypeError, match="position must be an int"):
        causal_conv1d_update(x, torch.zeros(2, 4, 3), w, None, 3, 1.5)


def test_causal_conv1d_update_kernel_rejects_bad_input():
    requires_kernel("causal_conv1d_update", "cpu")
    op = torch.ops.fastar.causal_conv1d_update.default
    with pytest.raises(RuntimeError, match=r"state must have shape \[2, 4, 3\]"):
        op(torch.randn(2, 4), torch.zeros(2, 4, 2), torch.randn(3, 4, 2), None, 3, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="position must be a one-element int64"):
        op(torch.randn(2, 4), torch.zeros(2, 4, 3), torch.randn(3, 4, 2), None, 3, torch.tensor([0.0]))


# ---------------------------------------------------------------------------------------------
# wavenet_step


def _step_case(device, dtype, B=3, T=12, L=4, k=2, R=8, D=6, S=16, A=32, cond=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.5):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    dil = [1, 2, 4, 1][:L] + [1] * max(0, L - 4)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = dict(in_w=r(A, R), in_b=r(R), conv_w=r(L, k, R, 2 * D), conv_b=r(L, 2 * D), res_skip_w=r(L, D, R + S),
             res_skip_b=r(L, R + S), out1_w=r(S, S, scale=0.3), out1_b=r(S), out2_w=r(S, A), out2_b=r(A))
    state = dict(samples=torch.randint(0, A, (B, T), generator=g).to(device),
                 queues=torch.zeros(B, sum(queue_sizes(dil, k)), R, device=device, dtype=acc),
                 position=torch.zeros(1, dtype=torch.int64, device=device),
                 logits=torch.zeros(B, A, device=device, dtype=acc),
                 noise=torch.rand(B, T, generator=g, dtype=torch.float64).to(device, acc))
    c = None
    if cond == "global":
        c = r(B, 1, L, 2 * D)
    elif cond == "local":
        c = r(B, T, L, 2 * D)
    return state, c, w, dil


def _call(fn, st, c, w, dil, num_prime=0, temperature=1.0, start=5, num_steps=1):
    return fn(st["samples"], st["queues"], st["position"], st["logits"], st["noise"], c, w["in_w"], w["in_b"],
              w["conv_w"], w["conv_b"], w["res_skip_w"], w["res_skip_b"], w["out1_w"], w["out1_b"], w["out2_w"],
              w["out2_b"], dil, num_prime, temperature, start, num_steps)


def _op(samples, queues, position, logits, noise, cond, *rest, **kw):
    """torch.ops.fastar.wavenet_step itself (no Python checks), called with wavenet_step's named arguments:
    the 10 weights and the dilations, then num_prime, temperature, start, num_steps (num_mixtures, num_bits)."""
    weights = WaveNetWeights(*rest[:11])
    args = wavenet_op_args(samples, queues, position, logits, noise, cond, weights, *rest[11:], **kw)
    return torch.ops.fastar.wavenet_step.default(*args)


def _clone(st):
    return {k: v.clone() for k, v in st.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("cond", [None, "global", "local"])
def test_wavenet_step_kernel_matches_ref(device, dtype, k, cond):
    requires_kernel("wavenet_step", device)
    st, c, w, dil = _step_case(device, dtype, k=k, cond=cond)
    st_k, st_r = _clone(st), _clone(st)
    T = st["samples"].shape[1]
    for t in range(T):
        with fastar.backend("kernel"):
            _call(wavenet_step, st_k, c, w, dil, num_prime=3)
        _call(wavenet_step_ref, st_r, c, w, dil, num_prime=3)
        torch.testing.assert_close(st_k["logits"], st_r["logits"], **tol(dtype, 10))
        torch.testing.assert_close(st_k["queues"], st_r["queues"], **tol(dtype, 10))
        assert torch.equal(st_k["samples"], st_r["samples"]), f"samples differ at step {t}"
    assert torch.equal(st_k["samples"][:, :3], st["samples"][:, :3])  # primed positions kept
    assert int(st_k["position"]) == T == int(st_r["position"])


@pytest.mark.parametrize("batch", [1, 8])
def test_wavenet_step_multi_step_and_temperature(device, batch):
    requires_kernel("wavenet_step", device)
    for temperature in (0.0, 0.7):
        st, c, w, dil = _step_case(device, torch.float64, B=batch, T=10, A=256, R=16, S=32, seed=3)
        st_k, st_r = _clone(st), _clone(st)
        with fastar.backend("kernel"):
            _call(wavenet_step, st_k, c, w, dil, temperature=temperature, num_steps=4)
            _call(wavenet_step, st_k, c, w, dil, temperature=temperature, num_steps=6)
        _call(wavenet_step_ref, st_r, c, w, dil, temperature=temperature, num_steps=10)
        assert torch.equal(st_k["samples"], st_r["samples"])
        torch.testing.assert_close(st_k["logits"], st_r["logits"], **tol(torch.float64))
        if temperature == 0.0:
            assert torch.equal(st_k["samples"][:, -1], st_k["logits"].argmax(1))


def test_wavenet_step_opcheck(device):
    requires_kernel("wavenet_step", device)
    st, c, w, dil = _step_case(device, torch.float32, T=6, cond="local")
    args = wavenet_op_args(st["samples"], st["queues"], st["position"], st["logits"], st["noise"], c,
                           WaveNetWeights(**w, dilations=dil), 0, 1.0, 5, 2)
    torch.library.opcheck(torch.ops.fastar.wavenet_step.default, args)


def test_wavenet_step_compiles(device):
    requires_kernel("wavenet_step", device)
    st, c, w, dil = _step_case(device, torch.float32, T=5, cond="global")
    st_r = _clone(st)

    @torch.compile(fullgraph=True)
    def step(samples, queues, position, logits):
        wavenet_step(samples, queues, position, logits, st["noise"], c, w["in_w"], w["in_b"], w["conv_w"],
                     w["conv_b"], w["res_skip_w"], w["res_skip_b"], w["out1_w"], w["out1_b"], w["out2_w"],
                     w["out2_b"], dil, 0, 1.0, 5)

    for _ in range(5):
        step(st["samples"], st["queues"], st["position"], st["logits"])
        _call(wavenet_step_ref, st_r, c, w, dil)
    assert torch.equal(st["samples"], st_r["samples"])
    torch.testing.assert_close(st["logits"], st_r["logits"], **tol(torch.float32, 10))


def test_wavenet_step_bad_input():
    st, c, w, dil = _step_case("cpu", torch.float32, B=3, T=6)
    bad = _clone(st)
    bad["queues"] = torch.zeros(3, 5, 8)
    with pytest.raises(ValueError, match="queues must have shape"):
        _call(wavenet_step, bad, c, w, dil)
    with pytest.raises(ValueError, match=r"cond must have shape \[3, 1 or 6, 4, 12\]"):
        _call(wavenet_step, _clone(st), torch.zeros(3, 4, 4, 12), w, dil)  # wrong length
    with pytest.raises(ValueError, match="cond must have shape"):
        _call(wavenet_step, _clone(st), torch.zeros(2, 1, 4, 12), w, dil)  # batch mismatch
    bad = _clone(st)
    bad["noise"] = torch.rand(2, 6)
    with pytest.raises(ValueError, match="noise must have shape"):
        _call(wavenet_step, bad, c, w, dil)
    with pytest.raises(ValueError, match="dilations must list 4"):
        _call(wavenet_step, _clone(st), c, w, dil[:3])
    w2 = dict(w, out1_b=torch.zeros(5))
    with pytest.raises(ValueError, match="out1_b must have shape"):
        _call(wavenet_step, _clone(st), c, w2, dil)
    w2 = dict(w, in_b=w["in_b"].double())
    with pytest.raises(TypeError, match="in_b dtype"):
        _call(wavenet_step, _clone(st), c, w2, dil)
    bad = _clone(st)
    bad["samples"] = bad["samples"].float()
    with pytest.raises(TypeError, match="samples must be a 2-D"):
        _call(wavenet_step, bad, c, w, dil)
    with pytest.raises(ValueError, match="start must be a code"):
        _call(wavenet_step, _clone(st), c, w, dil, start=99)


def test_wavenet_step_kernel_rejects_bad_input():
    requires_kernel("wavenet_step", "cpu")
    st, c, w, dil = _step_case("cpu", torch.float32, B=3, T=6)
    op = _op
    bad = _clone(st)
    bad["position"] = torch.tensor([5])
    with pytest.raises(RuntimeError, match="do not fit the 6 steps"):
        _call(op, bad, c, w, dil, num_steps=2)  # would run past the end of samples
    bad = _clone(st)
    bad["queues"] = torch.zeros(3, 7, 8)
    with pytest.raises(RuntimeError, match="queues must have shape"):
        _call(op, bad, c, w, dil)
    with pytest.raises(RuntimeError, match="cond must have shape"):
        _call(op, _clone(st), torch.zeros(3, 4, 4, 12), w, dil)
    # the packed form itself: csrc/wavenet.h's parse_wavenet_step reads pack and config by their documented layouts
    args = list(wavenet_op_args(st["samples"], st["queues"], st["position"], st["logits"], st["noise"], c,
                                WaveNetWeights(**w, dilations=dil), 0, 1.0, 5, 1))
    bad = list(args)
    bad[6] = args[6][:-1]
    with pytest.raises(RuntimeError, match="pack must hold the 10 weights"):
        torch.ops.fastar.wavenet_step.default(*bad)
    bad = list(args)
    bad[7] = args[7][:4]
    with pytest.raises(RuntimeError, match="config must hold"):
        torch.ops.fastar.wavenet_step.default(*bad)
    bad = list(args)
    bad[7] = args[7][:-1]                                       # one dilation short: 3 for 4 layers
    with pytest.raises(RuntimeError, match="dilations must list 4"):
        torch.ops.fastar.wavenet_step.default(*bad)


def test_wavenet_step_cuda_entry_checks_on_cpu_tensors():
    """The CUDA entry point's host side (nvcc-compiled csrc/cuda/wavenet.cu, the same parse_wavenet_step)
    reached without a GPU: redispatched straight to the CUDA kernel with CPU tensors, bad input must raise
    its sentence before anything touches a device."""
    from fastar import _backend
    if "wavenet_step" not in _backend.CUDA_KERNELS:
        pytest.skip("this build of fastar._C has no CUDA kernels")
    ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    st, c, w, dil = _step_case("cpu", torch.float32, B=3, T=6)
    args = list(wavenet_op_args(st["samples"], st["queues"], st["position"], st["logits"], st["noise"], c,
                                WaveNetWeights(**w, dilations=dil), 0, 1.0, 5, 1))
    for i, v, match in ((1, torch.zeros(3, 7, 8), "queues must have shape"),
                        (6, args[6][:-1], "pack must hold the 10 weights"),
                        (7, args[7][:-1], "dilations must list 4"),
                        (7, args[7][:2] + [0] + args[7][3:], "num_steps must be at least 1"),
                        (8, -1.0, "temperature must be non-negative")):
        bad = list(args)
        bad[i] = v
        with pytest.raises(RuntimeError, match=match):
            torch.ops.fastar.wavenet_step.default.redispatch(ks, *bad)


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_wavenet_step_kernel_thread_modes(batch, threads):
    # batch <= 2 with >= 2 threads runs the two-thread column split on CPU; the rest the row chunks
    requires_kernel("wavenet_step", "cpu")
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        st, c, w, dil = _step_case("cpu", torch.float32, B=batch, T=20, R=16, D=32, S=64, A=256, k=3, cond="local",
                                   seed=11)
        st_k, st_r = _clone(st), _clone(st)
        with fastar.backend("kernel"):
            _call(wavenet_step, st_k, c, w, dil, num_prime=4, num_steps=7)
            _call(wavenet_step, st_k, c, w, dil, num_prime=4, num_steps=13)
        _call(wavenet_step_ref, st_r, c, w, dil, num_prime=4, num_steps=20)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(st_k["samples"], st_r["samples"])
    torch.testing.assert_close(st_k["logits"], st_r["logits"], **tol(torch.float32, 10))
    torch.testing.assert_close(st_k["queues"], st_r["queues"], **tol(torch.float32, 10))


def test_wavenet_step_kernel_rejects_bad_prime_code():
    requires_kernel("wavenet_step", "cpu")
    st, c, w, dil = _step_case("cpu", torch.float32, B=2, T=6)
    st["samples"][1, 2] = 40  # A = 32
    with pytest.raises(RuntimeError, match=r"samples\[1, 2\] = 40 is not a code in \[0, 32\)"):
        _call(_op, st, c, w, dil, num_prime=4, num_steps=5)


# ---------------------------------------------------------------------------------------------
# wavenet_step, mixture head (num_mixtures = K > 0: float samples, in_w (1, R), noise (B, 2, T))


def _mix_case(device, dtype, K=4, B=3, T=12, k=2, cond=None, seed=0, num_prime=0, **sizes):
    st, c, w, dil = _step_case(device, dtype, B=B, T=T, k=k, A=3 * K, cond=cond, seed=seed, **sizes)
    g = torch.Generator().manual_seed(seed + 100)
    acc = st["queues"].dtype
    w["in_w"] = w["in_w"][:1].contiguous()
    # log-scales around e^-2: draws spread over many bins instead of piling up at +-1
    w["out2_w"] = w["out2_w"] * 0.15  # means mostly inside [-1, 1]
    w["out2_b"] = w["out2_b"] * 0.3
    w["out2_b"][2 * K:] -= 2.0
    st["samples"] = (torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 1).to(device, acc)
    st["noise"] = torch.rand(B, 2, T, generator=g, dtype=torch.float64).to(device, acc)
    return st, c, w, dil


def _mcall(fn, st, c, w, dil, K=4, num_prime=0, temperature=1.0, num_steps=1, num_bits=8):
    return fn(st["samples"], st["queues"], st["position"], st["logits"], st["noise"], c, w["in_w"], w["in_b"],
              w["conv_w"], w["conv_b"], w["res_skip_w"], w["res_skip_b"], w["out1_w"], w["out1_b"], w["out2_w"],
              w["out2_b"], dil, num_prime, temperature, 0, num_steps, num_mixtures=K, num_bits=num_bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("cond", [None, "global", "local"])
def test_wavenet_step_mixture_kernel_matches_ref(device, dtype, k, cond):
    requires_kernel("wavenet_step", device)
    st, c, w, dil = _mix_case(device, dtype, k=k, cond=cond)
    st_k, st_r = _clone(st), _clone(st)
    T = st["samples"].shape[1]
    for t in range(T):
        with fastar.backend("kernel"):
            _mcall(wavenet_step, st_k, c, w, dil, num_prime=3)
        _mcall(wavenet_step_ref, st_r, c, w, dil, num_prime=3)
        torch.testing.assert_close(st_k["logits"], st_r["logits"], **tol(dtype, 10))
        torch.testing.assert_close(st_k["queues"], st_r["queues"], **tol(dtype, 10))
        if dtype == torch.float64:
            assert torch.equal(st_k["samples"], st_r["samples"]), f"samples differ at step {t}"
        else:  # a float32 draw within rounding of a bin edge may land one bin over
            torch.testing.assert_close(st_k["samples"], st_r["samples"], rtol=0, atol=2 / 255 + 1e-6)
            st_r["samples"].copy_(st_k["samples"])
    assert torch.equal(st_k["samples"][:, :3], st["samples"][:, :3])  # primed positions kept
    bins = (st_k["samples"][:, 3:] + 1) * 255 / 2
    torch.testing.assert_close(bins, bins.round(), rtol=0, atol=1e-4)  # on the 8-bit bin centres
    assert len(set(st_k["samples"][:, 3:].flatten().tolist())) > 5
    assert int(st_k["position"]) == T == int(st_r["position"])


@pytest.mark.parametrize("batch", [1, 8])
def test_wavenet_step_mixture_multi_step_temperature_bits(device, batch):
    requires_kernel("wavenet_step", device)
    for temperature, bits in ((0.0, 8), (0.7, 8), (1.0, 16)):
        st, c, w, dil = _mix_case(device, torch.float64, B=batch, T=10, seed=3)
        st_k, st_r = _clone(st), _clone(st)
        with fastar.backend("kernel"):
            _mcall(wavenet_step, st_k, c, w, dil, temperature=temperature, num_steps=4, num_bits=bits)
            _mcall(wavenet_step, st_k, c, w, dil, temperature=temperature, num_steps=6, num_bits=bits)
        _mcall(wavenet_step_ref, st_r, c, w, dil, temperature=temperature, num_steps=10, num_bits=bits)
        assert torch.equal(st_k["samples"], st_r["samples"])
        torch.testing.assert_close(st_k["logits"], st_r["logits"], **tol(torch.float64))


def test_wavenet_step_mixture_opcheck(device):
    requires_kernel("wavenet_step", device)
    st, c, w, dil = _mix_case(device, torch.float32, T=6, cond="local")
    args = wavenet_op_args(st["samples"], st["queues"], st["position"], st["logits"], st["noise"], c,
                           WaveNetWeights(**w, dilations=dil), 0, 1.0, 0, 2, 4, 8)
    torch.library.opcheck(torch.ops.fastar.wavenet_step.default, args)


def test_wavenet_step_mixture_compiles(device):
    requires_kernel("wavenet_step", device)
    st, c, w, dil = _mix_case(device, torch.float64, T=5, cond="global")
    st_r = _clone(st)

    @torch.compile(fullgraph=True)
    def step(samples, queues, position, logits):
        wavenet_step(samples, queues, position, logits, st["noise"], c, w["in_w"], w["in_b"], w["conv_w"],
                     w["conv_b"], w["res_skip_w"], w["res_skip_b"], w["out1_w"], w["out1_b"], w["out2_w"],
                     w["out2_b"], dil, 0, 1.0, 0, num_mixtures=4, num_bits=8)

    for _ in range(5):
        step(st["samples"], st["queues"], st["position"], st["logits"])
        _mcall(wavenet_step_ref, st_r, c, w, dil)
    assert torch.equal(st["samples"], st_r["samples"])
    torch.testing.assert_close(st["logits"], st_r["logits"], **tol(torch.float64, 10))


def test_wavenet_step_mixture_bad_input():
    st, c, w, dil = _mix_case("cpu", torch.float32, B=3, T=6)
    with pytest.raises(ValueError, match=r"num_mixtures=5 needs 3K = 15"):
        _mcall(wavenet_step, _clone(st), c, w, dil, K=5)
    with pytest.raises(ValueError, match="num_mixtures must be 0"):
        _mcall(wavenet_step, _clone(st), c, w, dil, K=-1)
    with pytest.raises(ValueError, match=r"num_bits must be an int in \[1, 16\]"):
        _mcall(wavenet_step, _clone(st), c, w, dil, num_bits=17)
    bad = _clone(st)
    bad["noise"] = torch.rand(3, 6)
    with pytest.raises(ValueError, match=r"noise must be 3-D \(B, 2, T\)"):
        _mcall(wavenet_step, bad, c, w, dil)
    bad["noise"] = torch.rand(3, 1, 6)
    with pytest.raises(ValueError, match=r"noise must have shape \[3, 2, 6\]"):
        _mcall(wavenet_step, bad, c, w, dil)
    bad = _clone(st)
    bad["noise"] = torch.rand(3, 2, 6, dtype=torch.float64)
    with pytest.raises(TypeError, match="noise must be torch.float32"):
        _mcall(wavenet_step, bad, c, w, dil)
    bad = _clone(st)
    bad["samples"] = torch.zeros(3, 6, dtype=torch.int64)
    with pytest.raises(TypeError, match="audio values"):
        _mcall(wavenet_step, bad, c, w, dil)
    w2 = dict(w, in_w=torch.zeros(12, 8))
    with pytest.raises(ValueError, match=r"in_w must have shape \[1, 8\]"):
        _mcall(wavenet_step, _clone(st), c, w2, dil)


def test_wavenet_step_mixture_kernel_rejects_bad_input():
    requires_kernel("wavenet_step", "cpu")
    st, c, w, dil = _mix_case("cpu", torch.float32, B=3, T=6)
    op = _op
    with pytest.raises(RuntimeError, match=r"num_mixtures=5 needs 3K = 15"):
        _mcall(op, _clone(st), c, w, dil, K=5)
    with pytest.raises(RuntimeError, match=r"num_bits must be in \[1, 16\]"):
        _mcall(op, _clone(st), c, w, dil, num_bits=0)
    bad = _clone(st)
    bad["noise"] = torch.rand(3, 6)
    with pytest.raises(RuntimeError, match=r"noise must be a \(3, 2, 6\)"):
        _mcall(op, bad, c, w, dil)
    bad = _clone(st)
    bad["samples"] = torch.zeros(3, 6, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="samples must be a 2-D"):
        _mcall(op, bad, c, w, dil)
    w2 = dict(w, in_w=torch.zeros(12, 8))
    with pytest.raises(RuntimeError, match="in_w must have shape"):
        _mcall(op, _clone(st), c, w2, dil)


def _with_threads(n, fn):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("batch", [1, 3, 4])
@pytest.mark.parametrize("k", [2, 3])
def test_wavenet_step_small_batch_path_is_thread_count_invariant(batch, k):
    # float32 with batch <= 4 runs the packed two-part path on CPUs with AVX-512 (the
    # blocked path elsewhere): odd widths (D = 40, S = 72, A = 100 are not multiples of 16)
    # exercise the panel padding; one thread running both parts must give the very bits
    # two threads give, and both must match the reference.
    requires_kernel("wavenet_step", "cpu")
    st, c, w, dil = _step_case("cpu", torch.float32, B=batch, T=24, L=5, k=k, R=24, D=40, S=72, A=100,
                               cond="local", seed=5)
    runs = {}
    for threads in (1, 2):
        s = _clone(st)

        def go():
            with fastar.backend("kernel"):
                _call(wavenet_step, s, c, w, dil, num_prime=3, num_steps=10)
                _call(wavenet_step, s, c, w, dil, num_prime=3, num_steps=14)

        _with_threads(threads, go)
        runs[threads] = s
    for key in ("samples", "logits", "queues"):
        assert torch.equal(runs[1][key], runs[2][key]), key
    ref = _clone(st)
    _call(wavenet_step_ref, ref, c, w, dil, num_prime=3, num_steps=24)
    assert torch.equal(runs[2]["samples"], ref["samples"])
    torch.testing.assert_close(runs[2]["logits"], ref["logits"], **tol(torch.float32, 10))
    torch.testing.assert_close(runs[2]["queues"], ref["queues"], **tol(torch.float32, 10))


@pytest.mark.parametrize("mixture", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_wavenet_step_small_batch_path_packed_or_in_place_same_bits(monkeypatch, batch, mixture):
    # The two-part path packs its weights into panels for a call of many steps and reads them in place
    # for a call of few (the codec's one step a call): the same arithmetic, so the same bits, whatever
    # the steps per call and the thread count. FASTAR_WAVENET_CPU_PACK forces either; "auto" (the
    # default) chooses by the step count, so 1-step calls, mid-size calls and one long call all agree.
    requires_kernel("wavenet_step", "cpu")
    T = 40
    if mixture:
        st, c, w, dil = _mix_case("cpu", torch.float32, K=16, B=batch, T=T, k=3, cond="local", seed=11, R=24,
                                  D=40, S=72)
        call = lambda s, n: _mcall(wavenet_step, s, c, w, dil, K=16, num_prime=3, num_steps=n)  # noqa: E731
    else:
        st, c, w, dil = _step_case("cpu", torch.float32, B=batch, T=T, L=5, k=3, R=24, D=40, S=72, A=100,
                                   cond="local", seed=11)
        call = lambda s, n: _call(wavenet_step, s, c, w, dil, num_prime=3, num_steps=n)  # noqa: E731
    runs = {}
    for mode, chunks in (("always", [T]), ("never", [T]), ("never", [1] * T), ("auto", [1] * 5 + [3, 32]),
                         ("auto", [T])):
        for threads in (1, 2):
            s = _clone(st)
            monkeypatch.setenv("FASTAR_WAVENET_CPU_PACK", mode)

            def go():
                with fastar.backend("kernel"):
                    for n in chunks:
                        call(s, n)

            _with_threads(threads, go)
            runs[(mode, len(chunks), threads)] = s
    first = next(iter(runs.values()))
    for key, s in runs.items():
        for field in ("samples", "logits", "queues"):
            assert torch.equal(s[field], first[field]), (key, field)
    monkeypatch.setenv("FASTAR_WAVENET_CPU_PACK", "sometimes")
    with pytest.raises(RuntimeError, match="FASTAR_WAVENET_CPU_PACK must be auto, always or never"):
        with fastar.backend("kernel"):
            call(_clone(st), 1)


@pytest.mark.parametrize("batch", [1, 4])
def test_wavenet_step_small_batch_path_mixture_head(batch):
    # the packed two-part path with the mixture head (A = 3K = 48 splits into two parts)
    requires_kernel("wavenet_step", "cpu")
    st, c, w, dil = _mix_case("cpu", torch.float32, K=16, B=batch, T=20, k=2, cond="global", seed=9, R=16, D=32,
                              S=48)
    runs = {}
    for threads in (1, 2):
        s = _clone(st)

        def go():
            with fastar.backend("kernel"):
                _mcall(wavenet_step, s, c, w, dil, K=16, num_prime=2, num_steps=20)

        _with_threads(threads, go)
        runs[threads] = s
    assert torch.equal(runs[1]["samples"], runs[2]["samples"])
    assert torch.equal(runs[1]["logits"], runs[2]["logits"])
    ref = _clone(st)
    _mcall(wavenet_step_ref, ref, c, w, dil, K=16, num_prime=2, num_steps=20)
    torch.testing.assert_close(runs[2]["samples"], ref["samples"], **tol(torch.float32, 10))
    torch.testing.assert_close(runs[2]["logits"], ref["logits"], **tol(torch.float32, 10))
# ---------------------------------------------------------------------------------------------
# wavenet_step, both CUDA paths (FASTAR_WAVENET_CUDA_PATH=persistent|blocks; ignored on CPU, where
# these tests check the CPU kernel). With the path forced to "persistent", a CUDA call that the
# persistent kernel cannot take raises instead of falling back, so a passing test ran that path.

_PATHS = ["persistent", "blocks"]


@pytest.mark.parametrize("path", _PATHS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("head", ["softmax", "mixture"])
def test_wavenet_step_cuda_paths_match_ref(device, monkeypatch, path, batch, k, head):
    requires_kernel("wavenet_step", device)
    monkeypatch.setenv("FASTAR_WAVENET_CUDA_PATH", path)
    T = 14
    if head == "softmax":
        st, c, w, dil = _step_case(device, torch.float32, B=batch, T=T, k=k, cond="local", seed=21)
        call = _call
    else:
        st, c, w, dil = _mix_case(device, torch.float32, B=batch, T=T, k=k, cond="local", seed=21)
        call = _mcall
    st_k, st_r = _clone(st), _clone(st)
    with fastar.backend("kernel"):
        call(wavenet_step, st_k, c, w, dil, num_prime=2, num_steps=1)
        call(wavenet_step, st_k, c, w, dil, num_prime=2, num_steps=5)  # several steps in one launch
    call(wavenet_step_ref, st_r, c, w, dil, num_prime=2, num_steps=6)
    torch.testing.assert_close(st_k["logits"], st_r["logits"], **tol(torch.float32, 10))
    torch.testing.assert_close(st_k["queues"], st_r["queues"], **tol(torch.float32, 10))
    if head == "softmax":
        assert torch.equal(st_k["samples"], st_r["samples"])
    else:  # a float32 draw within rounding of a bin edge may land one bin over
        torch.testing.assert_close(st_k["samples"], st_r["samples"], rtol=0, atol=2 / 255 + 1e-6)
    assert torch.equal(st_k["samples"][:, :2], st["samples"][:, :2])
    assert int(st_k["position"]) == 6


@pytest.mark.parametrize("path", _PATHS)
@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16])
def test_wavenet_step_cuda_paths_half_weights(device, monkeypatch, path, wdtype):
    # float16/bfloat16 weights have a kernel on CUDA only (on CPU the op falls back to the
    # reference); teacher-forced: the kernel's samples and queues feed both sides each step
    requires_kernel("wavenet_step", device)
    monkeypatch.setenv("FASTAR_WAVENET_CUDA_PATH", path)
    st, c, w, dil = _step_case(device, torch.float32, B=3, T=8, k=2, cond="global", seed=5)
    wh = {k: v.to(wdtype) for k, v in w.items()}
    ch = c.to(wdtype)
    st_k, st_r = _clone(st), _clone(st)
    for _ in range(8):
        with fastar.backend("kernel" if device.type == "cuda" else "auto"):
            _call(wavenet_step, st_k, ch, wh, dil)
        _call(wavenet_step_ref, st_r, ch, wh, dil)
        # the reference adds in_w[c] + in_b in the weight dtype, the kernels in float32
        torch.testing.assert_close(st_k["logits"], st_r["logits"], **tol(wdtype))
        st_r["samples"].copy_(st_k["samples"])
        st_r["queues"].copy_(st_k["queues"])
    assert len(set(st_k["samples"].flatten().tolist())) > 2


@pytest.mark.parametrize("path", _PATHS)
@pytest.mark.parametrize("head", ["softmax", "mixture"])
def test_wavenet_step_cuda_paths_graph_replay(device, monkeypatch, path, head):
    # On CUDA one 4-step call is captured in a CUDA graph and replayed 3 times (the step counter
    # advances on the device); on CPU the same calls run eagerly.
    requires_kernel("wavenet_step", device)
    monkeypatch.setenv("FASTAR_WAVENET_CUDA_PATH", path)
    if head == "softmax":
        st, c, w, dil = _step_case(device, torch.float32, B=2, T=12, k=2, cond="local", seed=8)
        call = _call
    else:
        st, c, w, dil = _mix_case(device, torch.float32, B=2, T=12, k=2, cond="local", seed=8)
        call = _mcall
    st_k, st_r = _clone(st), _clone(st)

    def four():
        with fastar.backend("kernel"):
            call(wavenet_step, st_k, c, w, dil, num_steps=4)

    if device.type == "cuda":
        saved = _clone(st_k)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            four()  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            four()
        for name, v in saved.items():
            st_k[name].copy_(v)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    else:
        for _ in range(3):
            four()
    call(wavenet_step_ref, st_r, c, w, dil, num_steps=12)
    assert int(st_k["position"]) == 12
    torch.testing.assert_close(st_k["logits"], st_r["logits"], **tol(torch.float32, 10))
    if head == "softmax":
        assert torch.equal(st_k["samples"], st_r["samples"])
    else:
        torch.testing.assert_close(st_k["samples"], st_r["samples"], rtol=0, atol=2 / 255 + 1e-6)


def test_wavenet_step_forced_persistent_path_refuses_what_it_cannot_run(device, monkeypatch):
    requires_kernel("wavenet_step", device)
    st, c, w, dil = _step_case(device, torch.float64, B=2, T=4)
    monkeypatch.setenv("FASTAR_WAVENET_CUDA_PATH", "persistent")
    if device.type == "cuda":
        with pytest.raises(RuntimeError, match="persistent kernel does not take float64"):
            _call(_op, _clone(st), c, w, dil)
        st9, c9, w9, dil9 = _step_case(device, torch.float32, B=9, T=4)
        with pytest.raises(RuntimeError, match="batch 9 > 8"):
            _call(_op, st9, c9, w9, dil9)
        monkeypatch.setenv("FASTAR_WAVENET_CUDA_PATH", "sideways")
        with pytest.raises(RuntimeError, match="must be auto, persistent or blocks"):
            _call(_op, _clone(st), c, w, dil)
    else:  # the CPU kernel ignores the variable
        st_r = _clone(st)
        _call(_op, st, c, w, dil)
        _call(wavenet_step_ref, st_r, c, w, dil)
        assert torch.equal(st["samples"], st_r["samples"])


@pytest.mark.parametrize("batch", [1, 2, 8])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_wavenet_step_cpu_draws_the_ref_index_at_cdf_boundaries(batch, temperature):
    """float64 on CPU (batch 1-2: the column-split path, 8: the blocked one): with every step's
    uniform put right at a partial sum of the unnormalised CDF of that step's logits, the kernel
    draws exactly categorical_sample_ref's index."""
    from fastar.ops import mixture as M
    from tests.ops.test_mixture import boundary_uniforms
    requires_kernel("wavenet_step", "cpu")
    dev = torch.device("cpu")
    st, c, w, dil = _step_case(dev, torch.float64, B=batch, T=16, A=256, R=16, S=32, seed=5)
    g = torch.Generator().manual_seed(batch)
    for t in range(st["samples"].shape[1]):
        probe = _clone(st)
        with fastar.backend("kernel"):
            _call(wavenet_step, probe, c, w, dil, temperature=temperature)  # this step's logits
        u = boundary_uniforms(probe["logits"], temperature, g)
        st["noise"][:, t] = u
        with fastar.backend("kernel"):
            _call(wavenet_step, st, c, w, dil, temperature=temperature)
        assert torch.equal(st["logits"], probe["logits"])
        want = M.categorical_sample_ref(st["logits"], 1, noise=u, temperature=temperature)
        assert torch.equal(st["samples"][:, t], want), f"step {t}"
