"""fastar.threads: the one CPU thread policy of the decode loops.

- every op the policy may switch gives the same bits at one thread and at N (float32 and float64),
  and the ops it does not trust (torch's GEMMs and convolutions, the kernels that call them) are
  never switched: a step that runs one runs on one thread;
- sampling every registered family under the adaptive policy (and switching at every step), at any
  torch thread count, gives the bits of pinned(1);
- the measured choice's rule, driven by given timings; the environment, pinned(), and the thread
  count given back (also after an error).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fastar
from fastar import _backend, sampling
from fastar import threads as fthreads
from fastar.models import SPECS, GatedPixelCNN, PixelRNN, WaveNet
from fastar.models.pixelcnn_cache import ImageInferenceCache
from fastar.ops import (categorical_sample, causal_conv1d_update, diagonal_lstm_scan, masked_conv2d_at,
                        row_lstm_scan, sample_discretized_mix_logistic, wavenet_step)
from fastar.threads import StepThreads, ThreadChoice, choice_for, pinned, policy, step_is_neutral
from tests.conftest import requires_kernel
from tests.ops.test_wavenet_step import _call, _clone, _mcall, _mix_case, _step_case
from tests.ops.test_wavenet_step import _with_threads as _at   # fn() on n torch threads, the count given back

N = max(2, os.cpu_count() or 1)
DTYPES = [torch.float32, torch.float64]


def _same_bits(a, b):
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same_bits(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_bits(a[k], b[k]) for k in a)
    return a.dtype == b.dtype and torch.equal(a, b)


def _one_and_n(fn):
    """fn() at one thread and at N, each from fresh inputs (fn builds them)."""
    with torch.no_grad():
        return _at(1, fn), _at(N, fn)


# ---------------------------------------------------------------------------------------------------
# The ops the policy switches: the same bits at one thread and at N. One case set per op of
# FUSED_NEUTRAL_OPS (an op joins that set only with cases here), each large enough that N threads split it.

def _gated_fused_walk(dtype, n_threads, levels, n=13):
    """A whole image through the fused pixel step: the op at n_threads, the per-op row steps between at
    one thread (they are torch GEMMs, not what is tested here). Returns codes, every step's logits, the
    image and the row cache."""
    torch.manual_seed(0)
    model = GatedPixelCNN(3, levels, layers=3, channels=18, num_classes=3).to(dtype).eval()
    run = sampling.prepare(model, n, (4, 5), torch.arange(n) % 3, torch.Generator().manual_seed(2), record=True)
    cache = ImageInferenceCache(model, run, fused=True)
    assert cache._fused_fn.op is torch.ops.fastar.gated_pixelcnn_step
    recs = []
    with torch.no_grad():
        for t in range(run.seq.steps):
            if cache.plan(t)[0] == "row":
                _at(1, cache._row)
            _at(n_threads, lambda: cache._fused_fn.op(*cache._fused_args))
            recs.append(cache.params.clone())
    return run.values.clone(), torch.stack(recs), cache.x_img.clone(), cache._fused_args[1].clone()


def _case_gated(dtype):
    requires_kernel("gated_pixelcnn_step", "cpu")
    for levels in (2, 5):
        a, b = (_gated_fused_walk(dtype, t, levels) for t in (1, N))
        assert _same_bits(a, b), levels


def _wavenet_runs(dtype, B, mixture, threads, **sizes):
    if mixture:
        st, c, w, dil = _mix_case("cpu", dtype, B=B, T=24, k=2, cond="local", seed=7, **sizes)
        step = lambda: _mcall(wavenet_step, st, c, w, dil, num_prime=3, num_steps=12)   # noqa: E731
    else:
        st, c, w, dil = _step_case("cpu", dtype, B=B, T=24, k=3, cond="local", seed=7, **sizes)
        step = lambda: _call(wavenet_step, st, c, w, dil, num_prime=3, num_steps=12)    # noqa: E731
    with fastar.backend("kernel"):
        _at(threads, step)
        _at(threads, step)
    return _clone(st)


def _case_wavenet(dtype):
    requires_kernel("wavenet_step", "cpu")
    # batch 1-2: the column split (float64, or float32 without AVX-512) or the two-part path (float32 on
    # AVX-512); 3-4: two-part (float32, AVX-512) or row chunks; 5, 17: row chunks. Odd widths (D = 40,
    # S = 72, A = 100: not multiples of 16) put columns in the scalar tails.
    sizes = dict(L=5, R=24, D=40, S=72, A=100)
    for mixture in (False, True):
        for B in (1, 2, 3, 5, 17):
            sz = {k: v for k, v in sizes.items() if k != "A"} if mixture else sizes
            a, b = (_wavenet_runs(dtype, B, mixture, t, **sz) for t in (1, N))
            assert _same_bits(a, b), (mixture, B)


def _case_causal_conv1d_update(dtype):
    requires_kernel("causal_conv1d_update", "cpu")

    def run():
        g = torch.Generator().manual_seed(3)
        x = torch.randn(67, 16, 5, generator=g, dtype=dtype)     # 67 rows of 16 channels, 5 steps
        state = torch.zeros(67, 16, 4, dtype=dtype)
        w = torch.randn(32, 16, 3, generator=g, dtype=dtype)
        b = torch.randn(32, generator=g, dtype=dtype)
        with fastar.backend("kernel"):
            ys = [causal_conv1d_update(x[:, :, t], state, w, b, 2, torch.tensor([t])) for t in range(5)]
        return torch.stack(ys), state
    a, b = _one_and_n(run)
    assert _same_bits(a, b)


def _case_categorical_sample(dtype):
    requires_kernel("categorical_sample", "cpu")
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(37, 11, 29, generator=g, dtype=dtype) * 3
    noise = torch.rand(37, 29, generator=g, dtype=dtype)
    for kw in (dict(), dict(temperature=0.7, top_k=4), dict(temperature=0.0)):
        with fastar.backend("kernel"):
            a, b = _one_and_n(lambda: categorical_sample(logits, 1, noise=noise, **kw))
        assert _same_bits(a, b), kw
    flat = torch.randn(301, 256, generator=g, dtype=dtype)      # one position per row, as the heads draw
    u = torch.rand(301, generator=g, dtype=dtype)
    with fastar.backend("kernel"):
        a, b = _one_and_n(lambda: categorical_sample(flat, 1, noise=u))
    assert _same_bits(a, b)


def _case_sample_dml(dtype):
    requires_kernel("sample_discretized_mix_logistic", "cpu")
    g = torch.Generator().manual_seed(5)
    K = 5
    img = torch.randn(3, 10 * K, 9, 11, generator=g, dtype=dtype)
    img_u = torch.rand(3, 4, 9, 11, generator=g, dtype=dtype)
    aud = torch.randn(5, 3 * K, 333, generator=g, dtype=dtype)
    aud_u = torch.rand(5, 2, 333, generator=g, dtype=dtype)
    with fastar.backend("kernel"):
        for p, u in ((img, img_u), (aud, aud_u)):
            a, b = _one_and_n(lambda: sample_discretized_mix_logistic(p, K, noise=u, temperature=0.8))
            assert _same_bits(a, b), tuple(p.shape)


def _pixelrnn_fused_walk(dtype, n_threads, kind, n=13):
    """A whole image through the fused PixelRNN step: the op at n_threads, the row-start scans at one."""
    from fastar.models.pixelrnn_cache import PixelRNNCache

    torch.manual_seed(0)
    model = PixelRNN(kind, in_channels=3, levels=5, layers=2, hidden=12, num_classes=3).to(dtype).eval()
    run = sampling.prepare(model, n, (3, 4), torch.arange(n) % 3, torch.Generator().manual_seed(2))
    cache = PixelRNNCache(model, run, fused=True)
    assert cache._fused_fn.op is torch.ops.fastar.pixelrnn_step
    recs = []
    with torch.no_grad():
        for t in range(run.seq.steps):
            if cache.plan(t)[0] == "row":
                _at(1, lambda: cache._row(t // (cache.C * cache.W)))
            _at(n_threads, cache._fused_fn)
            recs.append(cache.params.clone())
    return run.values.clone(), torch.stack(recs), cache.x_img.clone(), cache.hs.clone(), cache.cs.clone()


def _case_pixelrnn(dtype):
    requires_kernel("pixelrnn_step", "cpu")
    for kind in ("diagonal", "row"):
        a, b = (_pixelrnn_fused_walk(dtype, t, kind) for t in (1, N))
        assert _same_bits(a, b), kind


def _pixelcnnpp_fused_walk(dtype, n_threads, classes, n=11):
    """A whole image through PixelCNN++'s cache as the policy would run it: the row steps (torch convolutions)
    at one thread, the pixel steps (one fused ul step and a copy) at n_threads; the engine's draw between."""
    from fastar.models import PixelCNNpp
    from fastar.models.pixelcnnpp_cache import MultiResolutionCache
    from fastar.sampling.engine import _draw_step

    torch.manual_seed(0)
    model = PixelCNNpp(3, 1, 16, 3, dropout=0.0, num_classes=classes).to(dtype).eval()
    cond = None if classes is None else torch.arange(n) % classes
    run = sampling.prepare(model, n, (5, 6), cond, torch.Generator().manual_seed(2))
    cache = MultiResolutionCache(model, run, fused=True)
    recs = []
    with torch.no_grad():
        for t in range(run.seq.steps):
            key, _ = cache.plan(t)
            params = _at(1 if key == "row" else n_threads, lambda: cache.step(key, t))
            recs.append(params.clone())
            cache.update(key, t, _draw_step(run, params))
            run.t.add_(1)
    return run.values.clone(), torch.stack(recs), [m.clone() for m in cache.maps]


def _case_pixelcnnpp(dtype):
    requires_kernel("pixelcnnpp_ul_step", "cpu")
    for classes in (None, 3):
        a, b = (_pixelcnnpp_fused_walk(dtype, t, classes) for t in (1, N))
        assert _same_bits(a, b), classes


NEUTRAL_CASES = {
    "fastar::pixelcnnpp_ul_step": _case_pixelcnnpp,
    "fastar::gated_pixelcnn_step": _case_gated,
    "fastar::pixelrnn_step": _case_pixelrnn,
    "fastar::wavenet_step": _case_wavenet,
    "fastar::causal_conv1d_update": _case_causal_conv1d_update,
    "fastar::categorical_sample": _case_categorical_sample,
    "fastar::sample_discretized_mix_logistic": _case_sample_dml,
}


def test_every_op_the_policy_may_switch_has_a_thread_count_test():
    assert set(NEUTRAL_CASES) == set(fthreads.FUSED_NEUTRAL_OPS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", sorted(NEUTRAL_CASES))
def test_switched_ops_give_the_same_bits_at_one_thread_and_at_n(op, dtype):
    NEUTRAL_CASES[op](dtype)


# ---------------------------------------------------------------------------------------------------
# What the policy does not trust: torch's GEMMs and convolutions (and fastar's kernels that call them)
# promise no bits across thread counts, so any step that runs one runs on one thread. The
# bits at one thread and at N are recorded (record_property) but not asserted: on this machine they
# may agree; that is a property of the BLAS, not a promise.

def _gemm_cases(dtype):
    g = torch.Generator().manual_seed(6)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    a, w, b = r(16, 96), r(96, 384), r(384)
    long_a, long_b = r(16, 4096), r(4096, 16)
    x1, ss = r(16, 32, 28), r(128, 32, 3)
    return {
        "aten::addmm": lambda: torch.addmm(b, a, w),
        "aten::mm": lambda: a @ w,
        "aten::convolution": lambda: F.conv1d(x1, ss, padding=1),
        # a long sum: MKL 2024.2 splits it over threads (other bits at 1 and 2 threads on the 2-core box)
        "aten::mm (16x4096 @ 4096x16)": lambda: long_a @ long_b,
    }


def _kernel_cases(dtype):
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype) * 0.5  # noqa: E731
    is_map, w_diag, w_row, bias = r(16, 64, 9, 9), r(64, 16, 2), r(64, 16, 3), r(64)
    cache, wc, bc = r(16, 24, 9, 9), r(48, 24, 3, 3), r(48)
    mask = torch.ones(48, 24, 3, 3, dtype=dtype)
    mask[:, :, 2] = 0
    mask[:, :, 1, 2] = 0
    row = torch.stack([torch.full((9,), 4), torch.arange(9)], 1)
    return {
        "fastar::diagonal_lstm_scan": lambda: diagonal_lstm_scan(is_map, w_diag, bias),
        "fastar::row_lstm_scan": lambda: row_lstm_scan(is_map, w_row, bias),
        "fastar::masked_conv2d_at": lambda: masked_conv2d_at(cache.clone(), None, wc, bc, mask, row[4:5]),
        "fastar::masked_conv2d_at (a row)": lambda: masked_conv2d_at(cache.clone(), None, wc, bc, mask, row),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_that_call_a_blas_are_never_switched(dtype, record_property):
    cases = dict(_gemm_cases(dtype))
    if _backend.has_ops("diagonal_lstm_scan", "masked_conv2d_at"):
        cases.update(_kernel_cases(dtype))
    for name, fn in cases.items():
        op = name.split(" ")[0]
        assert not step_is_neutral({op}), op
        with fastar.backend("kernel"):
            a, b = _one_and_n(fn)
        record_property(f"{name} {dtype} same bits at 1 and {N} threads", _same_bits(a, b))


_FRESH = r"""
import sys, torch
from fastar.models import SPECS
from fastar.threads import StepThreads
torch.set_num_threads(2)
spec = SPECS["wavenet"]
torch.manual_seed(0)
m = spec.cls(**spec.tiny[0]["config"]).eval()
seen = []
real_after = StepThreads.after
def after(self, token):
    real_after(self, token)
    seen.append(dict(self.kinds))
StepThreads.after = after
m.sample(2, spec.tiny[0]["shape"], progress=False)
assert any(k for k in seen), "no kind of step was recorded"
print("dynamo imported:", "torch._dynamo" in sys.modules)
"""


def test_recording_a_first_call_does_not_import_dynamo():
    """The op recorder is a dispatch mode, whose wrapper would import torch._dynamo on a process's first
    sampling call (about 0.8 s here): marked as already disabled, it records without the import."""
    import subprocess
    import sys

    if fthreads._raw_dispatch is None:
        pytest.skip("this torch does not wrap a dispatch mode's __torch_dispatch__ with _disable_dynamo")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "FASTAR_CPU_THREADS"}
    env["PYTHONPATH"] = root
    out = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dynamo imported: False" in out.stdout, out.stdout


def test_the_policy_switches_only_what_it_knows():
    assert step_is_neutral({"fastar::gated_pixelcnn_step"})
    assert step_is_neutral({"fastar::wavenet_step", "aten::select", "aten::_local_scalar_dense", "aten::ge"})
    assert step_is_neutral(set())
    for other in ("aten::addmm", "aten::tanh", "aten::sigmoid", "aten::add", "aten::sum", "fastar::new_op"):
        assert not step_is_neutral({"fastar::gated_pixelcnn_step", other}), other


def test_no_thread_override_or_test_only_ops_ship():
    for name in ("_thread_policy_override", "_adaptive_threads_trace"):
        assert not hasattr(torch.ops.fastar, name), name


# ---------------------------------------------------------------------------------------------------
# Whole sampling runs: adaptive (and switching at every step) == pinned(1), for every registered family.

def _family_models():
    for name, spec in SPECS.items():
        for i, tiny in enumerate(spec.tiny):
            for dtype in DTYPES:
                torch.manual_seed(0)
                m = spec.cls(**tiny["config"]).to(dtype).eval()
                cond = tiny.get("cond")
                n = 9
                if isinstance(cond, int):
                    cond = torch.full((n,), cond, dtype=torch.int64)
                yield f"{name}-{i}-{dtype}", m, tiny["shape"], cond, n
    torch.manual_seed(0)
    yield "pixelrnn-diag", PixelRNN("diagonal", 1, 2, layers=2, hidden=16).eval(), (8, 8), None, 8
    torch.manual_seed(0)
    yield "pixelrnn-row", PixelRNN("row", 1, 2, layers=2, hidden=16).eval(), (8, 8), None, 8
    torch.manual_seed(0)
    yield "gated", GatedPixelCNN(1, 2, layers=3, channels=16).eval(), (8, 8), None, 16
    torch.manual_seed(0)
    yield "wavenet", WaveNet(layers=4, stacks=2, residual_channels=32, dilation_channels=32, skip_channels=64,
                             quantization=256, kernel_size=2).eval(), (300,), None, 2


def _sample(m, shape, cond, n, fused, record):
    run = sampling.prepare(m, n, shape, cond, torch.Generator().manual_seed(5), record=record)
    return sampling.cached_sample(m, run, fused=fused)


@pytest.fixture
def n_threads():
    prev = torch.get_num_threads()
    torch.set_num_threads(N)
    yield
    torch.set_num_threads(prev)


def test_adaptive_sampling_gives_the_bits_of_pinned_one(monkeypatch, n_threads):
    monkeypatch.delenv("FASTAR_CPU_THREADS", raising=False)
    switched = {}
    calls = [0]

    def alternate(self, key):
        calls[0] += 1
        return calls[0] % 2 == 0
    for name, m, shape, cond, n in _family_models():
        for fused in (None, False):
            for record in (True, False):
                with pinned(1):
                    want = _sample(m, shape, cond, n, fused, record)
                got = _sample(m, shape, cond, n, fused, record)          # adaptive: measured
                assert _same_bits(want, got), (name, fused, record, "adaptive")
                with monkeypatch.context() as mp:                        # a switch at every step
                    mp.setattr(ThreadChoice, "use_all", alternate)
                    before = calls[0]
                    got = _sample(m, shape, cond, n, fused, record)
                    switched[name, fused, record] = calls[0] - before
                assert _same_bits(want, got), (name, fused, record, "alternate")
                assert torch.get_num_threads() == N
    # the fused steps were switched (the test is not vacuous); the per-op ones never are
    # (an unrecorded WaveNet run of 300 steps is two calls, a chunk of 256 and one of 44: two kinds, each
    # run once with its ops recorded, so nothing to switch; recorded, it is 300 calls of one step)
    assert switched["gated", None, False] > 0 and switched["wavenet", None, True] > 0
    assert all(v == 0 for (name, fused, _), v in switched.items() if fused is False)
    # PixelRNN's fused sub-pixel step is switched too (its row-start scans never are)
    assert all(v > 0 for (name, fused, _), v in switched.items() if name.startswith("pixelrnn") and fused is None)


def test_a_pinned_run_keeps_its_count_for_every_step(monkeypatch):
    monkeypatch.delenv("FASTAR_CPU_THREADS", raising=False)
    torch.manual_seed(0)
    m = GatedPixelCNN(1, 2, layers=2, channels=8).eval()
    seen = []
    real = ImageInferenceCache.advance

    def advance(self, key, t, k):
        seen.append(torch.get_num_threads())
        return real(self, key, t, k)
    monkeypatch.setattr(ImageInferenceCache, "advance", advance)
    prev = torch.get_num_threads()
    for n in sorted({1, N}):
        seen.clear()
        with pinned(n) as got:
            assert got == n and torch.get_num_threads() == n
            _sample(m, (4, 4), None, 6, None, False)
        assert seen and set(seen) == {n}
        assert torch.get_num_threads() == prev


# ---------------------------------------------------------------------------------------------------
# The measured choice (given timings)

def _drive(choice, cost, n, key="k"):
    """n calls of the rule, each costing cost(i, all_threads) seconds; returns the picks (1 = all)."""
    picks = []
    for i in range(n):
        a = choice.use_all(key)
        choice.record(key, a, cost(i, a))
        picks.append(int(a))
    return picks


B = ThreadChoice.BURST
S0 = 1 + 2 * B  # calls before the choice is made: one untimed, then a burst on all threads and one on one
MS = 1e-4   # the rule's costs below are in 0.1 ms: short calls, so bursts of B calls


def test_rule_times_both_then_keeps_the_faster_and_checks_less_often_while_it_holds():
    c = ThreadChoice()
    picks = _drive(c, lambda i, a: (2.0 if a else 1.0) * MS, 6000)      # all threads twice as slow (a core taken)
    assert picks[:S0] == [1] * (B + 1) + [0] * B                     # a burst of each, all threads first
    assert c.best("k") is False
    starts = [i for i in range(S0, 6000) if picks[i] and not picks[i - 1]]
    assert all(picks[i:i + B] == [1] * B and picks[i + B] == 0 for i in starts)   # re-timed in bursts
    assert starts[0] == S0 + ThreadChoice.EXPLORE - 1
    gaps = [b - a - B for a, b in zip(starts, starts[1:])]
    want, w = [], ThreadChoice.EXPLORE
    while len(want) < len(gaps):
        w = min(2 * w, ThreadChoice.EXPLORE_MAX)
        want.append(w - 1)                          # the wait doubles while the choice holds, then stays
    assert gaps == want and gaps[-1] == ThreadChoice.EXPLORE_MAX - 1
    c = ThreadChoice()
    picks = _drive(c, lambda i, a: (1.0 if a else 1.6) * MS, 300)       # a quiet machine: all threads faster
    assert picks[:S0] == [1] * (B + 1) + [0] * B and c.best("k") is True
    assert sum(1 for p in picks[S0:] if p == 0) <= 4 * B


def test_rule_ignores_outliers_and_a_slow_first_call_after_a_switch():
    c = ThreadChoice()
    # all threads 1.0 (one 1.5), but every 10th call takes 8x as long, and the first call of every
    # burst on all threads is cold (3.0): the choice must stay on all threads
    state = {"prev": None}

    def cost(i, a):
        s = (3.0 if state["prev"] is False else 1.0) if a else 1.5
        state["prev"] = a
        return s * (8 if i % 10 == 9 else 1) * MS
    _drive(c, cost, 1000)
    assert c.best("k") is True


def test_rule_follows_a_change_of_load_both_ways():
    c = ThreadChoice()
    busy_from, quiet_from = 400, 800
    cost = (lambda i, a: ((2.5 if busy_from <= i < quiet_from else 1.0) if a else 1.3) * MS)
    picks = _drive(c, cost, 1200)
    assert picks[busy_from - 5:busy_from] == [1] * 5
    first_one = next(i for i in range(busy_from, quiet_from) if picks[i] == 0)
    assert first_one - busy_from <= 3
    assert sum(picks[busy_from + 10:quiet_from]) <= 4 * B             # then only re-timing bursts on all threads
    back = next(i for i in range(quiet_from, 1200) if picks[i:i + 10] == [1] * 10)
    assert back - quiet_from <= ThreadChoice.EXPLORE_MAX + B          # all threads again from the next burst on


def test_long_calls_are_timed_one_at_a_time():
    c = ThreadChoice()                         # a WaveNet block of 256 steps: 25 ms a call
    picks = _drive(c, lambda i, a: (0.025 if a else 0.05), 200)
    assert picks[:3] == [1, 1, 0] and c.best("k") is True
    runs = "".join(map(str, picks[3:])).replace("1", " ").split()
    assert set(runs) == {"0"}                  # re-timings of one call each


# ---------------------------------------------------------------------------------------------------
# The loop's side: environment, pinned(), the thread count given back

def test_policy_reads_the_environment(monkeypatch):
    monkeypatch.delenv("FASTAR_CPU_THREADS", raising=False)
    assert policy() == "adaptive"
    for p in ("all", "one", "adaptive"):
        monkeypatch.setenv("FASTAR_CPU_THREADS", p)
        assert policy() == p
    monkeypatch.setenv("FASTAR_CPU_THREADS", "3")
    assert policy() == 3
    for bad in ("two", "0", "-1"):
        monkeypatch.setenv("FASTAR_CPU_THREADS", bad)
        with pytest.raises(ValueError, match=f"FASTAR_CPU_THREADS must be 'adaptive', 'all', 'one' or a number of "
                                             f"threads >= 1, got '{bad}'"):
            policy()


def test_pinned_sets_nests_and_gives_back():
    prev = torch.get_num_threads()
    with pinned(1):
        assert torch.get_num_threads() == 1
        with pinned(N):
            assert torch.get_num_threads() == N
        assert torch.get_num_threads() == 1
        with pinned() as n:
            assert n == 1
    assert torch.get_num_threads() == prev
    with pytest.raises(RuntimeError, match="inside"):
        with pinned(1):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == prev
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be a positive int or None"):
            with pinned(bad):
                pass


@pytest.fixture
def two_threads():
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(prev)


class _Run:
    def __init__(self, device="cpu", n=4):
        self.device = torch.device(device)
        self.dtype = torch.float32

        class _S:
            pass
        self.seq = _S()
        self.seq.n = n


def _fake_clock(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(fthreads, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    return clock


def test_neutral_steps_follow_the_cost_and_the_thread_count_comes_back(two_threads, monkeypatch):
    monkeypatch.delenv("FASTAR_CPU_THREADS", raising=False)
    clock = _fake_clock(monkeypatch)    # a clock the steps advance themselves (a real sleep has outliers)
    model = torch.nn.Linear(1, 1)
    st = StepThreads(model, _Run())
    assert st.active
    seen = []
    for _ in range(200):
        with st.step("pixel"):          # runs no torch op: neutral
            seen.append(torch.get_num_threads())
            clock[0] += 0.0008 if torch.get_num_threads() > 1 else 0.00008   # all threads 10x slower
    st.close()
    assert torch.get_num_threads() == 2
    assert seen[:S0] == [1] + [2] * B + [1] * B     # the first call (its ops recorded, on one thread) is untimed
    runs = "".join("1" if n == 2 else "0" for n in seen[S0:]).replace("0", " ").split()
    assert runs and set(runs) == {"1" * B}          # all threads again only in re-timing bursts
    assert st.steps[False] == 200 - 1 - B - B * len(runs) and st.steps["pinned"] == 1
    assert choice_for(model) is st.choice           # kept with the model for its next loop
    st2 = StepThreads(model, _Run())
    with st2.step("pixel"):
        assert torch.get_num_threads() == 1         # a new loop records its kinds again (on one thread)
    with st2.step("pixel"):
        assert torch.get_num_threads() == 1         # then starts from what the first loop measured
    st2.close()
    assert torch.get_num_threads() == 2


def test_steps_that_run_a_gemm_run_on_one_thread(two_threads, monkeypatch):
    monkeypatch.delenv("FASTAR_CPU_THREADS", raising=False)
    clock = _fake_clock(monkeypatch)
    st = StepThreads(torch.nn.Linear(1, 1), _Run())
    a = torch.randn(4, 8)
    seen = {"gemm": [], "copy": []}
    for _ in range(100):
        for kind in seen:
            with st.step(kind):
                seen[kind].append(torch.get_num_threads())
                (a @ a.t()) if kind == "gemm" else a.clone()
                clock[0] += 0.0008 if torch.get_num_threads() > 1 else 0.00008
    st.close()
    assert set(seen["gemm"]) == {1} and st.steps["pinned"] == 100 + 1    # + the copy's first call
    assert 2 in seen["copy"] and 1 in seen["copy"]
    assert st.kinds == {("gemm", 1, 2, 4, torch.float32): False, ("copy", 1, 2, 4, torch.float32): True}


def test_inert_off_the_cpu_on_one_thread_when_fixed_and_when_pinned(two_threads, monkeypatch):
    monkeypatch.setenv("FASTAR_CPU_THREADS", "all")
    st = StepThreads(torch.nn.Linear(1, 1), _Run())
    with st.step("x"):
        assert torch.get_num_threads() == 2
    assert not st.active and st.choice is None
    for env, n in (("one", 1), ("3", 3)):
        monkeypatch.setenv("FASTAR_CPU_THREADS", env)
        st = StepThreads(torch.nn.Linear(1, 1), _Run())
        with st.step("x"):
            assert torch.get_num_threads() == n
        st.close()
        assert torch.get_num_threads() == 2
    monkeypatch.setenv("FASTAR_CPU_THREADS", "one")
    with pinned():                                  # pinned() wins over the environment
        st = StepThreads(torch.nn.Linear(1, 1), _Run())
        assert not st.active
    monkeypatch.delenv("FASTAR_CPU_THREADS")
    assert not StepThreads(torch.nn.Linear(1, 1), _Run("meta")).active
    torch.set_num_threads(1)
    assert not StepThreads(torch.nn.Linear(1, 1), _Run()).active


@pytest.mark.parametrize("env", ["one", "adaptive"])
def test_an_error_in_a_step_gives_the_threads_back(two_threads, monkeypatch, env):
    # under "adaptive" the error cuts the first call short while its ops are being recorded
    monkeypatch.setenv("FASTAR_CPU_THREADS", env)
    torch.manual_seed(0)
    m = GatedPixelCNN(1, 2, layers=2, channels=8).eval()
    run = sampling.prepare(m, 2, (4, 4), generator=torch.Generator().manual_seed(0))
    cache = m.allocate_inference_cache(run, fused=None)

    def boom(*a, **k):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    monkeypatch.setattr(type(cache), "advance", boom)
    monkeypatch.setattr(type(cache), "step", boom)
    monkeypatch.setattr(m, "allocate_inference_cache", lambda run, fused=None: cache)
    with pytest.raises(RuntimeError, match="boom"):
        sampling.cached_sample(m, run)
    assert torch.get_num_threads() == 2
    assert torch._C._len_torch_dispatch_stack() == 0      # no recorder left behind
