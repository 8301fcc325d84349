"""MADE, NADE and RNADE beyond the contract suite: the autoregressive property by Jacobian for every mask,
full connectivity with wide layers, NADE's O(DH) forward against a per-dimension loop, normalisation over
all 2^D binary inputs (ensembles included), RNADE's density integrating to one in 1 and 2 dimensions,
the one-pass sampler == the naive one for many masks, orderings, depths and ensembles, bad input."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import fastar
from fastar import sampling
from fastar.models import MADE, NADE, RNADE

pytestmark = pytest.mark.usefixtures("one_thread")


def _made(**kw):
    torch.manual_seed(kw.pop("init", 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MADE(**kw).double().eval()


CONFIGS = [
    dict(in_features=7, hidden_sizes=[6], num_masks=4),
    dict(in_features=7, hidden_sizes=[9, 8], num_masks=4, connectivity="agnostic", direct=True, seed=1),
    dict(in_features=6, hidden_sizes=[5, 7, 5], num_masks=3, connectivity="agnostic", seed=2),
    dict(in_features=5, hidden_sizes=[8], levels=4, num_masks=3, direct=True, seed=3),
    dict(in_features=6, hidden_sizes=[3], num_masks=2, seed=4),                          # narrower than D - 1
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_jacobian_autoregressive_for_every_mask(cfg):
    m = _made(**cfg)
    D, P = m.in_features, m.P
    for k in range(m.num_masks):
        rank = torch.empty(D, dtype=torch.int64)
        rank[m.orders[k]] = torch.arange(D)
        allowed = rank[:, None] > rank[None, :]                           # output d may see input j
        seen = torch.zeros(D, D, dtype=torch.bool)
        for s in range(4):
            x = torch.rand(1, D, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) * 2 - 0.5
            J = torch.autograd.functional.jacobian(lambda z: m.net(z, k).reshape(-1), x)   # (D P, 1, D)
            J = J.reshape(D, P, D).abs().amax(1)
            assert not bool(J[~allowed].any()), f"mask {k}: an output depends on an input at or after its step"
            seen |= J != 0
        # structurally, the mask product connects exactly what the degree rule allows (<= allowed; == when wide)
        ms, mo, md = m.masks(k)
        path = ms[0].double()
        for mm in ms[1:]:
            path = mm.double() @ path
        conn = (mo.double() @ path).reshape(D, P, D).amax(1) > 0
        if md is not None:
            conn |= md.reshape(D, P, D).any(1)
        assert not bool(conn[~allowed].any())
        if min(cfg["hidden_sizes"]) >= D - 1 and m.connectivity == "fixed" or md is not None:
            assert torch.equal(conn, allowed), "a wide (or direct) MADE must connect every earlier input"
        assert not bool(seen[~conn].any())


def test_wide_layers_connect_every_earlier_input_by_jacobian():
    m = _made(in_features=6, hidden_sizes=[10, 10], num_masks=3)   # widths >= D - 1, fixed connectivity
    with torch.no_grad():
        for layer in m.layers:
            layer.bias.fill_(3.0)                                  # no dead ReLU: every path carries gradient
            layer.weight.abs_()
    for k in range(3):
        rank = torch.empty(6, dtype=torch.int64)
        rank[m.orders[k]] = torch.arange(6)
        J = torch.autograd.functional.jacobian(lambda z: m.net(z, k).reshape(-1), torch.rand(1, 6).double())
        assert torch.equal(J.reshape(6, 6) != 0, rank[:, None] > rank[None, :])


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.get("levels", 2) == 2]
                         + [dict(in_features=10, hidden_sizes=[12], num_masks=2, seed=5)])
def test_made_normalised_over_every_binary_input(cfg):
    m = _made(**cfg)
    D = m.in_features
    x = torch.tensor(list(itertools.product((0, 1), repeat=D)))
    with torch.no_grad():
        total = torch.logsumexp(-m.nll(x), 0)                       # the ensemble (mixed orderings included)
        for k in range(m.num_masks):
            with m.single_mask(k):
                torch.testing.assert_close(torch.logsumexp(-m.nll(x), 0).item(), 0.0, rtol=0, atol=1e-9)
    torch.testing.assert_close(total.item(), 0.0, rtol=0, atol=1e-9)


def test_made_categorical_normalised():
    m = _made(in_features=4, hidden_sizes=[6, 5], levels=3, num_masks=2, connectivity="agnostic", seed=1)
    x = torch.tensor(list(itertools.product(range(3), repeat=4)))
    with torch.no_grad():
        torch.testing.assert_close(torch.logsumexp(-m.nll(x), 0).item(), 0.0, rtol=0, atol=1e-9)


def test_ensemble_is_log_mean_exp_of_the_masks():
    m = _made(in_features=6, hidden_sizes=[7], num_masks=3)
    x = torch.randint(0, 2, (5, 6))
    with torch.no_grad():
        per = []
        for k in range(3):
            with m.single_mask(k):
                per.append(-m.nll(x))
        want = -(torch.logsumexp(torch.stack(per), 0) - torch.log(torch.tensor(3.0, dtype=torch.float64)))
        torch.testing.assert_close(m.nll(x), want)


def test_training_mode_moves_to_the_next_mask():
    m = _made(in_features=6, hidden_sizes=[7], num_masks=3).train()
    x = torch.randint(0, 2, (4, 6))
    seen = []
    for _ in range(4):
        m.nll(x)
        seen.append(int(m.mask_index))
    assert seen == [1, 2, 0, 1]


@pytest.mark.parametrize("cfg", CONFIGS + [dict(in_features=9, hidden_sizes=[8, 8], num_masks=3,
                                               natural_ordering=True, connectivity="agnostic", seed=6),
                                          dict(in_features=6, hidden_sizes=[7], levels=3, num_masks=4,
                                               order=[5, 0, 4, 1, 3, 2], connectivity="agnostic", seed=7)],
                         ids=range(len(CONFIGS) + 2))
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_one_pass_sampler_equals_naive_for_every_mask(cfg, backend):
    m = _made(**cfg)

    def draw(method, **kw):
        with fastar.backend(backend):
            return m.sample(6, None, generator=torch.Generator().manual_seed(11), method=method, progress=False, **kw)

    shared = all(torch.equal(m.orders[0], m.orders[k]) for k in range(m.num_masks))
    if shared:                                                     # the ensemble's mixture, step by step
        naive = draw("naive")
        assert torch.equal(draw("cached"), naive) and torch.equal(draw("cached", fused=False), naive)
    else:
        with pytest.raises(ValueError, match="several orderings"):
            draw("cached")
    for k in range(m.num_masks):                                   # every mask alone, in its own ordering
        with m.single_mask(k):
            naive = draw("naive")
            assert torch.equal(draw("cached"), naive) and torch.equal(draw("cached", fused=False), naive)
            assert torch.equal(draw("cached", temperature=0.0), draw("naive", temperature=0.0))


def test_samples_come_back_in_the_natural_layout():
    # a MADE that copies: every output d's logit is huge and of the sign of the *natural* input before it
    m = _made(in_features=4, hidden_sizes=[3], direct=True, order=[2, 0, 3, 1])
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.out.bias.copy_(torch.tensor([-50.0, -50.0, 50.0, -50.0]))      # the first drawn (dim 2) is 1, ...
        m.direct.weight.copy_(torch.full((4, 4), 100.0))                  # ... and every later one copies it
    x = m.sample(3, None, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(x, torch.ones(3, 4, dtype=torch.int64))
    with torch.no_grad():
        m.out.bias.copy_(torch.tensor([50.0, 50.0, -50.0, 50.0]))         # dim 2 drawn first is 0
        m.direct.weight.fill_(0.0)
    x = m.sample(3, None, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(x, torch.tensor([[1, 1, 0, 1]] * 3))


def test_made_bad_input():
    with pytest.raises(ValueError, match="permutation"):
        MADE(4, [5], order=[0, 1, 1, 2])
    with pytest.raises(ValueError, match="permutation"):
        MADE(4, [5], order=[0, 1, 2])
    with pytest.raises(ValueError, match="hidden_sizes"):
        MADE(4, [])
    with pytest.raises(ValueError, match="hidden_sizes"):
        MADE(4, [0])
    with pytest.raises(ValueError, match="connectivity"):
        MADE(4, [5], connectivity="random")
    with pytest.warns(UserWarning, match="narrower than D - 1"):
        MADE(10, [4])
    m = _made(in_features=4, hidden_sizes=[5])
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        m.nll(torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="lie in"):
        m.nll(torch.full((2, 4), 2))
    with pytest.raises(ValueError, match="single_mask"):
        with m.single_mask(3):
            pass


@pytest.mark.parametrize("D", [7, 70])                              # 70: across the forward's blocks of 32
def test_nade_forward_equals_a_per_dimension_loop(D):
    torch.manual_seed(0)
    m = NADE(D, 5).double()
    with torch.no_grad():
        m.c.normal_()
        m.b.normal_()
    x = torch.randint(0, 2, (4, D))
    lg = m(x)
    want = torch.zeros(4, D, dtype=torch.float64)
    for n in range(4):
        a = m.c.detach().clone()
        for d in range(D):
            want[n, d] = m.b[d] + m.V[d] @ torch.sigmoid(a)
            a = a + x[n, d] * m.W[d]
    torch.testing.assert_close(lg, want, rtol=1e-12, atol=1e-12)
    J = torch.autograd.functional.jacobian(lambda z: m.logits_flat(z), torch.rand(1, D).double())
    assert not bool(J.reshape(D, D).triu().ne(0).any())             # d sees only x_<d
    assert bool(J.reshape(D, D)[torch.ones(D, D).tril(-1).bool()].ne(0).all())   # and every x_<d


def test_nade_normalised_over_every_binary_input():
    torch.manual_seed(1)
    m = NADE(10, 6).double()
    x = torch.tensor(list(itertools.product((0, 1), repeat=10)))
    with torch.no_grad():
        torch.testing.assert_close(torch.logsumexp(-m.nll(x), 0).item(), 0.0, rtol=0, atol=1e-9)


def _rnade(d, seed=0):
    torch.manual_seed(seed)
    m = RNADE(d, 4, 3).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def test_rnade_density_integrates_to_one_in_one_dimension():
    m = _rnade(1)
    x = torch.linspace(-40, 40, 400001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        p = torch.exp(-m.nll(x))
    torch.testing.assert_close(torch.trapezoid(p, x[:, 0]).item(), 1.0, rtol=0, atol=1e-6)


def test_rnade_density_integrates_to_one_in_two_dimensions():
    m = _rnade(2, seed=3)
    g = torch.linspace(-20, 20, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    with torch.no_grad():
        p = torch.exp(-m.nll(torch.stack([xx.flatten(), yy.flatten()], 1))).view(len(g), len(g))
    total = torch.trapezoid(torch.trapezoid(p, g, dim=1), g)
    torch.testing.assert_close(total.item(), 1.0, rtol=0, atol=1e-4)


def test_rnade_cached_equals_naive_bit_for_bit_and_autoregressive():
    m = _rnade(5)
    a = m.sample(7, None, generator=torch.Generator().manual_seed(2), progress=False)
    b = m.sample(7, None, generator=torch.Generator().manual_seed(2), method="naive", progress=False)
    assert torch.equal(a, b) and a.dtype == torch.float64
    J = torch.autograd.functional.jacobian(lambda z: m.params_flat(z), torch.randn(1, 5).double())  # (1, P, D, 1, D)
    assert not bool(J[0].abs().amax(0)[:, 0].triu().ne(0).any())


def test_rnade_and_nade_bad_input():
    m = _rnade(3)
    with pytest.raises(ValueError, match="finite"):
        m.nll(torch.tensor([[0.0, float("nan"), 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="finite"):
        m.nll(torch.tensor([[0.0, float("inf"), 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        m.nll(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="floats"):
        m.nll(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="components"):
        RNADE(3, 4, 0)
    n = NADE(4, 3)
    with pytest.raises(ValueError, match="lie in"):
        n.nll(torch.full((1, 4), 3))
    with pytest.raises(ValueError, match="hidden"):
        NADE(4, 0)


def test_a_batch_of_one_leaves_the_packed_weights_alone():
    """At n = 1 the sampler's accumulator must be a copy of the cached output biases, not a view of them
    (found by the codec's chunked round trip: a one-example sample corrupted every later one)."""
    from fastar.models import SPECS

    tiny = SPECS["made"].tiny[0]
    torch.manual_seed(0)
    a = SPECS["made"].cls(**tiny["config"]).double().eval()
    torch.manual_seed(0)
    b = SPECS["made"].cls(**tiny["config"]).double().eval()
    for fused in (None, False):
        for _ in range(2):
            a.sample(1, tiny["shape"], generator=torch.Generator().manual_seed(1), progress=False, fused=fused)
        got = a.sample(4, tiny["shape"], generator=torch.Generator().manual_seed(2), progress=False, fused=fused,
                       return_params=True)
        want = b.sample(4, tiny["shape"], generator=torch.Generator().manual_seed(2), progress=False, fused=fused,
                        return_params=True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
