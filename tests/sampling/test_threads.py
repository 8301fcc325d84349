"""The decode loop's measured choice between all of torch's threads and one (fastar.sampling.threads):
the rule, driven by given timings; the loop's thread count back as it was; and that the choice never
changes a sample or a parameter."""
from __future__ import annotations


import pytest
import torch

from fastar import sampling
from fastar.models import GatedPixelCNN, PixelRNN, WaveNet
from fastar.sampling.threads import StepThreads, ThreadChoice, choice_for, policy


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
    picks = _drive(c, cost, 1000)
    assert c.best("k") is True
    runs = "".join(map(str, picks[S0:])).replace("1", " ").split()
    assert runs and set(runs) == {"0" * B} and len(runs) <= 6   # one-thread calls: re-timing bursts only


def test_rule_follows_a_change_of_load_both_ways():
    c = ThreadChoice()
    busy_from, quiet_from = 400, 800
    cost = (lambda i, a: ((2.5 if busy_from <= i < quiet_from else 1.0) if a else 1.3) * MS)
    picks = _drive(c, cost, 1200)
    assert picks[busy_from - 5:busy_from] == [1] * 5
    first_one = next(i for i in range(busy_from, quiet_from) if picks[i] == 0)
    assert first_one - busy_from <= 3                                 # the median of the last 5 flips it
    assert sum(picks[busy_from + 10:quiet_from]) <= 4 * B             # then only re-timing bursts on all threads
    back = next(i for i in range(quiet_from, 1200) if picks[i:i + 10] == [1] * 10)
    assert back - quiet_from <= ThreadChoice.EXPLORE_MAX + B          # all threads again from the next burst on


def test_long_calls_are_timed_one_at_a_time():
    c = ThreadChoice()                         # a WaveNet block of 256 steps: 25 ms a call
    picks = _drive(c, lambda i, a: (0.025 if a else 0.05), 200)
    assert picks[:3] == [1, 1, 0] and c.best("k") is True
    runs = "".join(map(str, picks[3:])).replace("1", " ").split()
    assert set(runs) == {"0"}                  # re-timings of one call each


def test_policy_reads_the_environment(monkeypatch):
    monkeypatch.delenv("FASTAR_CPU_THREADS", raising=False)
    assert policy() == "adaptive"
    for p in ("all", "one", "adaptive"):
        monkeypatch.setenv("FASTAR_CPU_THREADS", p)
        assert policy() == p
    monkeypatch.setenv("FASTAR_CPU_THREADS", "two")
    with pytest.raises(ValueError, match="FASTAR_CPU_THREADS must be 'adaptive', 'all' or 'one', got 'two'"):
        policy()


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


def test_steps_follow_the_cost_and_the_thread_count_comes_back(two_threads, monkeypatch):
    monkeypatch.delenv("FASTAR_CPU_THREADS", raising=False)
    # a clock the steps advance themselves (a real sleep has outliers on a loaded machine)
    clock = [0.0]
    import fastar.sampling.threads as threads_mod
    monkeypatch.setattr(threads_mod, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    model = torch.nn.Linear(1, 1)
    st = StepThreads(model, _Run())
    assert st.active
    seen = []
    for _ in range(200):
        with st.step("pixel"):
            seen.append(torch.get_num_threads())
            clock[0] += 0.0008 if torch.get_num_threads() > 1 else 0.00008   # all threads 10x slower
    st.close()
    assert torch.get_num_threads() == 2
    assert seen[:S0] == [2] * (B + 1) + [1] * B
    runs = "".join("1" if n == 2 else "0" for n in seen[S0:]).replace("0", " ").split()
    assert runs and set(runs) == {"1" * B}                 # all threads again only in re-timing bursts
    assert st.steps[False] == 200 - (B + 1) - B * len(runs)
    assert choice_for(model) is st.choice                 # kept with the model for its next loop
    st2 = StepThreads(model, _Run())
    with st2.step("pixel"):
        assert torch.get_num_threads() == 1               # starts from what the first loop measured
    st2.close()
    assert torch.get_num_threads() == 2


def test_inert_off_the_cpu_on_one_thread_and_when_fixed(two_threads, monkeypatch):
    monkeypatch.setenv("FASTAR_CPU_THREADS", "all")
    st = StepThreads(torch.nn.Linear(1, 1), _Run())
    with st.step("x"):
        assert torch.get_num_threads() == 2
    assert not st.active and st.choice is None
    monkeypatch.setenv("FASTAR_CPU_THREADS", "one")
    st = StepThreads(torch.nn.Linear(1, 1), _Run())
    with st.step("x"):
        assert torch.get_num_threads() == 1
    st.close()
    assert torch.get_num_threads() == 2
    monkeypatch.delenv("FASTAR_CPU_THREADS")
    assert not StepThreads(torch.nn.Linear(1, 1), _Run("meta")).active
    torch.set_num_threads(1)
    assert not StepThreads(torch.nn.Linear(1, 1), _Run()).active


def test_an_error_in_a_step_gives_the_threads_back(two_threads, monkeypatch):
    monkeypatch.setenv("FASTAR_CPU_THREADS", "one")
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


def _models():
    torch.manual_seed(0)
    yield "pixelrnn", PixelRNN("diagonal", 1, 2, layers=2, hidden=16).eval(), (8, 8), 8
    torch.manual_seed(0)
    yield "rowlstm", PixelRNN("row", 1, 2, layers=2, hidden=16).eval(), (8, 8), 8
    torch.manual_seed(0)
    yield "gated", GatedPixelCNN(1, 2, layers=3, channels=16).eval(), (8, 8), 16
    torch.manual_seed(0)
    yield "wavenet", WaveNet(layers=4, stacks=2, residual_channels=32, dilation_channels=32, skip_channels=64,
                             quantization=256, kernel_size=2).eval(), (300,), 2


def test_the_choice_never_changes_a_sample_or_a_parameter(two_threads, monkeypatch):
    for name, m, shape, n in _models():
        res = {}
        for mode in ("all", "one", "adaptive", "alternate"):
            monkeypatch.setenv("FASTAR_CPU_THREADS", "adaptive" if mode == "alternate" else mode)
            if mode == "alternate":              # switch the thread count at every step
                flip = iter(range(10 ** 9))
                monkeypatch.setattr(ThreadChoice, "use_all", lambda self, key: next(flip) % 2 == 0)
            out = []
            for fused in (None, False):
                run = sampling.prepare(m, n, shape, generator=torch.Generator().manual_seed(5), record=True)
                out.append(sampling.cached_sample(m, run, fused=fused))
            res[mode] = out
            assert torch.get_num_threads() == 2
        monkeypatch.undo()
        monkeypatch.setenv("FASTAR_CPU_THREADS", "adaptive")
        for mode in ("one", "adaptive", "alternate"):
            for (va, pa), (vb, pb) in zip(res["all"], res[mode]):
                assert torch.equal(va, vb) and torch.equal(pa, pb), (name, mode)


def test_the_fused_ops_stand_aside_inside_the_loop_only(two_threads, monkeypatch):
    op = torch.ops.fastar._thread_policy_override
    with pytest.raises(RuntimeError, match=r"policy must be -1 \(none\), 0 \(adaptive\), 1 \(all\) or 2 \(one\), got 7"):
        op(7)
    monkeypatch.delenv("FASTAR_CPU_THREADS", raising=False)
    torch.manual_seed(0)
    m = GatedPixelCNN(1, 2, layers=2, channels=8).eval()
    run = sampling.prepare(m, 2, (4, 4), generator=torch.Generator().manual_seed(0))
    cache = m.allocate_inference_cache(run, fused=None)
    seen = []
    real = type(cache).advance

    def advance(self, key, t, k):
        seen.append(op(1))                 # the override in force during the step (put back at once)
        op(seen[-1])
        return real(self, key, t, k)
    monkeypatch.setattr(type(cache), "advance", advance)
    monkeypatch.setattr(m, "allocate_inference_cache", lambda run, fused=None: cache)
    sampling.cached_sample(m, run)
    assert seen and set(seen) == {1}       # all threads whenever the loop picks all
    assert op(-1) == -1                    # and nothing left behind
