"""The engine on toy models of its own (no model family involved): slots and their checks, the step
index every cache is given, recording, given values (prefix / mask, prime) for per-op and fused
caches, the default full-forward cache, temperature 0."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastar import sampling
from fastar.models.base import AutoregressiveModel
from fastar.nn.heads import Categorical
from fastar.sampling import InferenceCache, Sequence


class Counter(AutoregressiveModel):
    """Sequences of T codes in [0, K): step t's logits are w[t] + v * (sum of the earlier codes), so
    every step depends on every earlier one. Values stored in reversed order (slot T - 1 - t) to prove
    the engine honours the slot table."""

    def __init__(self, T=5, K=3, reverse=True, cache="per_op", chunk=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.T, self.K, self.reverse, self.kind, self.chunk = T, K, reverse, cache, chunk
        self.w = nn.Parameter(torch.randn(T, K, generator=g, dtype=torch.float64))
        self.v = nn.Parameter(torch.randn(K, generator=g, dtype=torch.float64))
        self.seen = []

    def slots(self):
        return torch.arange(self.T - 1, -1, -1) if self.reverse else torch.arange(self.T)

    def params_of(self, steps):
        """steps (N, T) codes in step order -> (T, N, K)."""
        csum = torch.cumsum(steps.to(self.w.dtype), 1) - steps.to(self.w.dtype)           # sum of earlier codes
        return (self.w[None] + csum[:, :, None] * self.v).transpose(0, 1)

    def nll(self, x, cond=None):
        steps = x[:, self.slots()]
        p = self.params_of(steps)
        return torch.stack([nn.functional.cross_entropy(p[t], steps[:, t], reduction="none")
                            for t in range(self.T)]).sum(0)

    def sequence(self, n=None, shape=None, cond=None, num_prime=0):
        n = 1 if n is None else n
        slots = self.slots()
        T = self.T

        def forward(values, t=None):
            p = self.params_of(values[:, slots])
            return p if t is None else p[t]

        return Sequence(n=n, steps=T, head=Categorical(self.K), forward=forward, slots=slots, shape=(T,),
                        num_prime=num_prime)

    def allocate_inference_cache(self, run, fused=None):
        if self.kind == "none":
            raise AssertionError("not called")
        return (_FusedCounter if self.kind == "fused" else _PerOpCounter)(self, run)


class _PerOpCounter(InferenceCache):
    capturable = False

    def __init__(self, model, run):
        super().__init__(run)
        self.m, self.total = model, torch.zeros(run.seq.n, dtype=torch.float64)

    def step(self, key, t):
        assert int(self.run.t) == t
        self.m.seen.append(("step", t))
        return self.m.w[t][None] + self.total[:, None] * self.m.v

    def update(self, key, t, values):
        assert values.shape == (self.run.seq.n, 1)
        self.m.seen.append(("update", t))
        self.total = self.total + values[:, 0].to(torch.float64)


class _FusedCounter(_PerOpCounter):
    draws = True

    def plan(self, t):
        return "chunk", self.m.chunk

    def advance(self, key, t, k):
        run = self.run
        self.m.seen.append(("advance", t, k))
        for s in range(t, t + k):
            p = self.m.w[s][None] + self.total[:, None] * self.m.v
            v = run.seq.head.draw(p, run.noise[s], run.temperature)
            col = run.slot_table[s]
            if run.given_mask is not None:
                v = torch.where(run.given_mask[:, col], run.given_values[:, col], v)
            run.values[:, col] = v
            self.total = self.total + v[:, 0].to(torch.float64)
            self.params = p
        run.t.add_(k)


class NoCache(Counter):
    allocate_inference_cache = None


def _draw(m, method="cached", seed=0, **kw):
    return m.sample(4, generator=torch.Generator().manual_seed(seed), method=method, progress=False, **kw)


@pytest.mark.parametrize("kind", ["per_op", "fused"])
def test_cached_equals_naive_and_the_slot_table_is_honoured(kind):
    m = Counter(cache=kind)
    naive, cached = _draw(m, "naive"), _draw(m)
    assert torch.equal(naive, cached)
    run = sampling.prepare(m, 4, None, None, torch.Generator().manual_seed(0))
    x = sampling.cached_sample(m, run)
    assert torch.equal(run.step_values[:, :, 0], x.flip(1))          # step t lives in slot T - 1 - t


def test_per_op_caches_are_given_the_step_index():
    m = Counter(cache="per_op")
    _draw(m)
    assert m.seen == [(w, t) for t in range(5) for w in ("step", "update")]


def test_fused_chunks_and_recording_one_step_at_a_time():
    m = Counter(cache="fused", chunk=2)
    _draw(m)
    assert m.seen == [("advance", 0, 2), ("advance", 2, 2), ("advance", 4, 1)]   # the last chunk is cut at T
    m.seen.clear()
    x, params = m.sample(4, generator=torch.Generator().manual_seed(0), progress=False, return_params=True)
    assert m.seen == [("advance", t, 1) for t in range(5)] and params.shape == (5, 4, 3)
    torch.testing.assert_close(params, m.params_of(x[:, m.slots()]), rtol=0, atol=1e-12)


def test_a_model_without_a_cache_runs_full_forward_passes():
    m = NoCache()
    assert torch.equal(_draw(m), _draw(Counter(), "naive"))


@pytest.mark.parametrize("kind", ["per_op", "fused"])
def test_prefix_and_mask_are_kept_and_steer_the_rest(kind):
    m = Counter(cache=kind)
    prefix = torch.tensor([[2, 2, 2, 2, 2]] * 4)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[:, 0] = True                                                  # slot 0 is the last step
    mask[1, 3] = True
    a, b = _draw(m, prefix=prefix, mask=mask), _draw(m, "naive", prefix=prefix, mask=mask)
    assert torch.equal(a, b) and bool((a[mask] == 2).all())
    free = _draw(m)
    assert not torch.equal(free[:, 1:], a[:, 1:]) or torch.equal(free, a)


def test_prime_fills_the_first_steps():
    m = Counter(cache="per_op", reverse=False)
    prime = torch.tensor([[1, 0], [2, 2], [0, 0], [1, 1]])
    x = _draw(m, prime=prime)
    assert torch.equal(x[:, :2], prime) and torch.equal(x, _draw(m, "naive", prime=prime))
    with pytest.raises(ValueError, match=r"prime has batch 3 but n is 4"):
        _draw(m, prime=torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"prime must be a \(N, P\) tensor"):
        _draw(m, prime=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        _draw(m, prime=torch.full((4, 2), 7))


def test_bad_given_values():
    m = Counter()
    with pytest.raises(ValueError, match="needs a mask"):
        _draw(m, prefix=torch.zeros(4, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="without a prefix"):
        _draw(m, mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be bool"):
        _draw(m, prefix=torch.zeros(4, 5, dtype=torch.int64), mask=torch.ones(4, 5))
    with pytest.raises(ValueError, match="does not broadcast"):
        _draw(m, prefix=torch.zeros(4, 5, dtype=torch.int64), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape sample returns, \[4, 5\]"):
        _draw(m, prefix=torch.zeros(4, 6, dtype=torch.int64), mask=torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        _draw(m, prefix=torch.full((4, 5), 3), mask=torch.ones(4, 5, dtype=torch.bool))


def test_slot_tables_must_be_permutations():
    m = Counter()
    m.slots = lambda: torch.tensor([0, 1, 1, 3, 4])
    with pytest.raises(ValueError, match="permutation"):
        _draw(m)
    m.slots = lambda: torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"\(5, 1\)"):
        _draw(m)


def test_temperature_zero_takes_the_mode():
    m = Counter(cache="fused")
    x = _draw(m, temperature=0.0)
    p = m.params_of(x[:, m.slots()])
    assert torch.equal(x[:, m.slots()], p.argmax(2).t())
    assert torch.equal(x, _draw(m, temperature=0.0, seed=9))           # no uniform matters
