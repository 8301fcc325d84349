"""The generation contract, run over every registered model family (``fastar.models.SPECS``) and
each of its tiny configs (``ModelSpec.tiny``). A family that registers itself is held to all of it:

- cached == naive from one seed, exactly in float64 (and the per-op cache == the fused one), also
  with given values (a prefix and mask for every family, a prime for sequence models): the given
  values are kept and the rest equals the naive sampler's;
- the cached sampler's per-step parameters == the teacher-forced forward pass, to 1e-5, and their
  log-probabilities sum to ``-nll``;
- causality: changing any value at step t or later leaves step t's parameters unchanged, and every
  step after the first depends on some earlier one;
- normalisation: over every sequence of the tiny domain, ``exp(-nll)`` sums to one (a real-valued
  head: every step's conditional density integrates to one);
- bad input to ``nll`` and ``sample`` raises ValueError naming what was expected.
"""
from __future__ import annotations

import inspect
import itertools

import pytest
import torch

import fastar
from fastar import sampling
from fastar.models import SPECS

CASES = [(name, i) for name, spec in SPECS.items() for i in range(len(spec.tiny))]
IDS = [f"{name}-{i}" for name, i in CASES]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_family_has_tiny_configs():
    assert SPECS, "no model family is registered"
    for name, spec in SPECS.items():
        assert spec.tiny, f"{name} registers no tiny config, so the contract suite cannot hold it"


def _case(name, i, device="cpu", dtype=torch.float64, n=3):
    spec = SPECS[name]
    tiny = spec.tiny[i]
    torch.manual_seed(0)
    model = spec.cls(**tiny["config"]).to(device, dtype).eval()
    cond = tiny.get("cond")
    if isinstance(cond, int):
        cond = torch.full((n,), cond, dtype=torch.int64, device=device)
    return model, tiny["shape"], cond


def _run(model, shape, cond, n, seed=1, record=False):
    return sampling.prepare(model, n, shape, cond, torch.Generator().manual_seed(seed), record=record)


@pytest.mark.parametrize("name,i", CASES, ids=IDS)
def test_cached_equals_naive_float64(device, name, i):
    model, shape, cond = _case(name, i, device)
    naive = sampling.naive_sample(model, _run(model, shape, cond, 3))
    cached = sampling.cached_sample(model, _run(model, shape, cond, 3))
    per_op = sampling.cached_sample(model, _run(model, shape, cond, 3), fused=False)
    assert torch.equal(naive, cached) and torch.equal(naive, per_op)
    again = sampling.cached_sample(model, _run(model, shape, cond, 3, seed=2))
    assert not torch.equal(again, cached), "another seed drew the same values: the uniforms are not used"
    # the public door gives the same values
    pub = model.sample(3, shape, cond=cond, generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.equal(pub, cached)


def _given_mask(run, seed):
    """A random set of whole steps given (every example its own), as a mask in the layout ``sample``
    returns; a step's V values are given together (they are drawn jointly)."""
    seq = run.seq
    g = torch.Generator().manual_seed(seed)
    steps = torch.rand(seq.n, seq.steps, generator=g) < 0.45                  # (N, T)
    steps[0, :] = False                                                      # one example draws everything
    steps[-1, : max(1, seq.steps // 2)] = True                               # one is a classic prefix
    slots = torch.zeros(seq.n, run.values.shape[1], dtype=torch.bool)
    slots[:, run.slot_table.flatten().cpu()] = steps.repeat_interleave(run.slot_table.shape[1], 1)
    return slots[:, seq.output_slots()].reshape(seq.n, *seq.shape)


@pytest.mark.parametrize("name,i", CASES, ids=IDS)
def test_given_values_kept_and_rest_equals_naive(device, name, i):
    model, shape, cond = _case(name, i, device)
    x0 = sampling.naive_sample(model, _run(model, shape, cond, 3))            # a full draw to take values from
    mask = _given_mask(_run(model, shape, cond, 3), seed=i)
    kw = dict(prefix=x0, mask=mask.to(device))

    def draw(method, **extra):
        return model.sample(3, shape, cond=cond, generator=torch.Generator().manual_seed(7), method=method,
                            progress=False, **kw, **extra)

    naive = draw("naive")
    cached = draw("cached")
    per_op = draw("cached", fused=False)
    assert torch.equal(naive, cached) and torch.equal(naive, per_op)
    m = mask.to(device)
    assert torch.equal(cached[m], x0[m]), "a given value was not kept"


@pytest.mark.parametrize("name,i", CASES, ids=IDS)
def test_prime_for_sequence_models(device, name, i):
    model, shape, cond = _case(name, i, device)
    if "num_prime" not in inspect.signature(model.sequence).parameters:
        with pytest.raises(ValueError, match="takes no prime"):
            model.sample(3, shape, cond=cond, prime=torch.zeros(3, 1, dtype=torch.int64), progress=False)
        return
    x0 = sampling.naive_sample(model, _run(model, shape, cond, 3))
    P = 2
    prime = x0[:, :P] if x0.shape[1] >= P else x0
    runs = {}
    for method in ("naive", "cached"):
        runs[method] = model.sample(3, shape, cond=cond, generator=torch.Generator().manual_seed(3), method=method,
                                    prime=prime, progress=False, return_params=True)
    (a, pa), (b, pb) = runs["naive"], runs["cached"]
    assert torch.equal(a, b) and a.shape == x0.shape
    torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-5)
    other = model.sample(3, shape, cond=cond, generator=torch.Generator().manual_seed(3), prime=prime.flip(0),
                         progress=False, return_params=True)[1]
    assert not torch.equal(other[P], pb[P]) or torch.equal(prime, prime.flip(0)), "the prime is not used"


@pytest.mark.parametrize("name,i", CASES, ids=IDS)
@pytest.mark.parametrize("fused", [None, False])
def test_step_params_equal_teacher_forced_forward(device, name, i, fused):
    model, shape, cond = _case(name, i, device)
    run = _run(model, shape, cond, 3, record=True)
    x, params = sampling.cached_sample(model, run, fused=fused)
    forced = run.seq.forward(run.values, None)                       # (T, N, P) from one full pass
    assert params.shape == forced.shape
    torch.testing.assert_close(params, forced, rtol=1e-5, atol=1e-5)
    # the recorded parameters score the drawn values as the model's nll does
    head = run.seq.head
    vals = run.step_values                                            # (N, T, V) in step order
    lp = sum(head.log_prob(params[t], vals[:, t]) for t in range(run.seq.steps))
    torch.testing.assert_close(-lp, model.nll(x, cond), rtol=1e-6, atol=1e-6)


def _support(head):
    """(K, V) every joint value of a step, or None for a head with no finite support."""
    try:
        return head.support()
    except NotImplementedError:
        return None


def _moved(values, cols, support):
    """`values` with every example's step at the value columns `cols` (V,) moved to another value."""
    out = values.clone()
    cur = values[:, cols]                                             # (N, V)
    if support is None:                                               # real values: any other value will do
        out[:, cols] = cur + 0.37
        return out
    sup = support.to(torch.float64)
    idx = (cur.to(torch.float64)[:, None, :] == sup[None]).all(2).to(torch.int64).argmax(1)
    out[:, cols] = sup[(idx + 1) % len(sup)].to(out.dtype)
    return out


@pytest.mark.parametrize("name,i", CASES, ids=IDS)
def test_causality(name, i):
    _check_causal(*_case(name, i))


def test_causality_check_catches_a_leak():
    # A PixelCNN whose first layer sees its own sub-pixel (mask B where mask A belongs) must fail the check.
    model, shape, cond = _case("pixelcnn", 0)
    with torch.no_grad():
        model.input_conv.mask[:, :, 3, 3] = 1.0
    with pytest.raises(AssertionError, match="depend on step"):
        _check_causal(model, shape, cond)


def _check_causal(model, shape, cond):
    run = _run(model, shape, cond, 3)
    seq = run.seq
    sampling.naive_sample(model, run)
    values, support, table = run.values.clone(), _support(seq.head), run.slot_table
    with torch.no_grad():
        base = seq.forward(values, None)                              # (T, N, P)
        outs = [seq.forward(_moved(values, table[s], support), None) for s in range(seq.steps)]
    for t in range(seq.steps):
        for s in range(t, seq.steps):
            torch.testing.assert_close(outs[s][t], base[t], rtol=0, atol=0,
                                       msg=f"step {t}'s parameters depend on step {s}")
        if t:
            assert any(not torch.equal(outs[s][t], base[t]) for s in range(t)), f"step {t} sees no earlier step"


@pytest.mark.parametrize("name,i", CASES, ids=IDS)
def test_normalised_over_the_tiny_domain(name, i):
    model, shape, cond = _case(name, i, n=1)
    run = _run(model, shape, cond, 1)
    seq, T = run.seq, run.seq.steps
    support = _support(seq.head)
    if support is None:
        _check_density_normalised(model, shape, cond)
        return
    assert len(support) ** T <= 4096, "tiny config too large to enumerate"
    grid = torch.tensor(list(itertools.product(range(len(support)), repeat=T)))   # (M, T) step order
    values = torch.zeros(len(grid), run.values.shape[1], dtype=run.values.dtype)
    values[:, run.slot_table.flatten()] = support[grid].reshape(len(grid), -1).to(values.dtype)
    seq.n = len(grid)
    x = seq.finish_values(values)
    c = None if cond is None else cond.expand(len(grid))
    with torch.no_grad():
        nll = model.nll(x, c)
    assert nll.shape == (len(grid),)
    total = torch.logsumexp(-nll, 0)
    torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=1e-9)


def _check_density_normalised(model, shape, cond):
    """A real-valued head: every step's conditional density (the recorded parameters of sampled
    prefixes) integrates to one by the head's quadrature; with per-step parameters == forward and
    -nll == the sum of the steps' log-densities (test_step_params_equal_teacher_forced_forward), the
    joint density integrates to one."""
    run = _run(model, shape, cond, 4, record=True)
    _, params = sampling.cached_sample(model, run)
    head = run.seq.head
    for t in range(run.seq.steps):
        pts, logw = head.quadrature(params[t])                        # (N, M, V), (N, M)
        N, M = logw.shape
        lp = head.log_prob(params[t].repeat_interleave(M, 0), pts.reshape(N * M, -1)).view(N, M)
        total = torch.logsumexp(lp + logw, 1)
        torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,i", CASES, ids=IDS)
def test_bits_per_dim_and_loss_from_nll(name, i):
    model, shape, cond = _case(name, i)
    x = model.sample(3, shape, cond=cond, generator=torch.Generator().manual_seed(0), progress=False)
    nll = model.nll(x, cond)
    assert nll.shape == (3,) and bool(torch.isfinite(nll).all())
    if _support(_run(model, shape, cond, 3).seq.head) is not None:
        assert bool((nll > 0).all())                                  # probabilities, not densities: nll > 0
    torch.testing.assert_close(model.bits_per_dim(x, cond), nll / (x[0].numel() * torch.log(torch.tensor(2.0)).double()))
    torch.testing.assert_close(model.loss(x, cond), nll.mean())


@pytest.mark.parametrize("name,i", CASES, ids=IDS)
def test_bad_input(name, i):
    model, shape, cond = _case(name, i)
    with pytest.raises(ValueError, match="method"):
        model.sample(1, shape, cond=cond, method="fast")
    for bad_n in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n must be a positive int"):
            model.sample(bad_n, shape, cond=cond, progress=False)
    for bad_t in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            model.sample(3, shape, cond=cond, temperature=bad_t, progress=False)
    with pytest.raises(ValueError, match="shape"):
        model.sample(3, (0,) * len(shape), cond=cond, progress=False)
    with pytest.raises(ValueError):
        model.nll(torch.zeros(2, dtype=torch.int64), cond)            # no batch of sequences


def _out_of_range(x, head):
    bad = x.clone()
    if not x.is_floating_point():                                     # integer codes: no model has 10**6 levels
        bad.view(-1)[0] = 10 ** 6
    elif _support(head) is not None:
        bad.view(-1)[0] = 2.0
    else:                                                             # real values: only non-finite is out
        bad.view(-1)[0] = float("inf")
    return bad


def _nan(x, head):
    bad = x.clone().double() if not x.is_floating_point() else x.clone()
    bad.view(-1)[0] = float("nan")
    return bad


# (id, what to call with (model, x, cond, head), the message it must raise). A new family is held to
# every row; a family-specific case goes in the family's own tests.
BAD_INPUT = [
    ("nll of one sequence without a batch", lambda m, x, c, h: m.nll(x[0], c), None),
    ("nll of a value out of range", lambda m, x, c, h: m.nll(_out_of_range(x, h), c), "lie in|binary|finite"),
    ("nll of NaN", lambda m, x, c, h: m.nll(_nan(x, h), c), "NaN|integer|int64|binary|lie in|finite"),
    ("nll of non-integer codes", lambda m, x, c, h: m.nll(x.double() + 0.5, c) if not x.is_floating_point() else
     m.nll(x.long(), c), "integer|int64|binary|floats"),
    ("loss of an empty batch", lambda m, x, c, h: m.loss(x[:0], None if c is None else c[:0]), "empty"),
    ("sample of a float shape", lambda m, x, c, h: m.sample(1, tuple(float(s) + 0.5 for s in x.shape[2:]
                                                                    if x.dim() == 4) or (2.5,),
                                                            cond=None if c is None else c[:1], progress=False),
     "shape"),
    ("sample with the batch of cond wrong", lambda m, x, c, h: m.sample(5, x.shape[2:] if x.dim() == 4 else
                                                                      (x.shape[1],), cond=c if c is not None
                                                                      else torch.zeros(2, dtype=torch.int64),
                                                                      progress=False),
     "batch|unconditional|cond|global_cond"),
    ("sample with a float generator", lambda m, x, c, h: m.sample(1, x.shape[2:] if x.dim() == 4 else (x.shape[1],),
                                                                cond=None if c is None else c[:1], generator=1.5,
                                                                progress=False), "generator must be a torch.Generator"),
]


@pytest.mark.parametrize("row", range(len(BAD_INPUT)), ids=[r[0] for r in BAD_INPUT])
@pytest.mark.parametrize("name,i", CASES, ids=IDS)
def test_bad_input_table(name, i, row):
    model, shape, cond = _case(name, i)
    run = _run(model, shape, cond, 3)
    x = sampling.naive_sample(model, run)
    what, fn, match = BAD_INPUT[row]
    with pytest.raises(ValueError, match=match):
        fn(model, x, cond, run.seq.head)
    # an empty batch is a correct empty result for nll, not an error
    assert model.nll(x[:0], None if cond is None else cond[:0]).shape == (0,)


def test_reference_backend_draws_the_same():
    for name, i in CASES:
        model, shape, cond = _case(name, i)
        a = model.sample(3, shape, cond=cond, generator=torch.Generator().manual_seed(5), progress=False)
        with fastar.backend("reference"):
            b = model.sample(3, shape, cond=cond, generator=torch.Generator().manual_seed(5), progress=False)
        assert torch.equal(a, b), name
