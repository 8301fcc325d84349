"""made_sample_steps (MADE's degree-bucket one-pass sampler): the kernel against its PyTorch twin for every
depth, K components, levels, direct connections, given values, temperature and dtype; in chunks as in one
call; opcheck; bad input. The op is a sampler with no gradient (nothing to gradcheck: its outputs are
integer draws and state buffers, not differentiable functions of the weights)."""
from __future__ import annotations

import warnings

import pytest
import torch

from fastar.models import MADE
from fastar.ops import made as mo
from tests.conftest import requires_kernel

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    dict(in_features=9, hidden_sizes=[8]),
    dict(in_features=8, hidden_sizes=[9, 7], direct=True, connectivity="agnostic", seed=1),
    dict(in_features=7, hidden_sizes=[6, 10, 5], levels=4, seed=2),
    dict(in_features=8, hidden_sizes=[9, 9], num_masks=3, natural_ordering=True, connectivity="agnostic", seed=3),
    dict(in_features=6, hidden_sizes=[8], levels=3, num_masks=2, direct=True, natural_ordering=True,
         connectivity="agnostic", seed=4),
]


def _args(cfg, device, dtype=torch.float64, n=5, given=False, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MADE(**cfg).to(device, dtype).eval()
    ks = list(range(m.num_masks))
    order = m.orders[0]
    counts, pack, config, out_b, hid_b = m.pack(ks, order, dtype)
    st = mo.MadeState(n, counts, config, out_b, hid_b, dtype, torch.device(device))
    D = m.in_features
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.rand(D, n, generator=g, dtype=dtype).to(device)
    gv = gm = None
    if given:
        gv = torch.randint(0, m.levels, (n, D), generator=g).to(device)
        gm = (torch.rand(n, D, generator=g) < 0.4).to(device)
    cfg_ = list(config)
    cfg_[1] = D
    pos = torch.zeros(1, dtype=torch.int64, device=device)
    return [st.codes, st.hidden, st.acc, st.logw, pos, st.params, noise, gv, gm, counts.to(device),
            [p.to(device) for p in pack], cfg_, 1.0]


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else ([p.clone() for p in a] if isinstance(a, list) and a and
                                                          isinstance(a[0], torch.Tensor) else a) for a in args]


@pytest.mark.parametrize("i", range(len(CASES)))
@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.0])
def test_kernel_equals_reference(device, i, given, temperature):
    requires_kernel("made_sample_steps", device)
    for dtype in (torch.float64, torch.float32):
        a = _args(CASES[i], device, dtype, given=given, seed=i)
        a[-1] = temperature
        b = _clone(a)
        torch.ops.fastar.made_sample_steps(*a)
        mo.made_sample_steps_ref(*b)
        assert torch.equal(a[0], b[0]), "codes differ"
        assert int(a[4][0]) == int(b[4][0]) == a[0].shape[1]
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        for j in (1, 2, 3, 5):
            torch.testing.assert_close(a[j], b[j], rtol=tol, atol=tol)
        if given:
            assert torch.equal(a[0][a[8]], a[7][a[8]]), "a given value was not kept"


@pytest.mark.parametrize("i", [1, 3])
def test_chunks_equal_one_call(device, i):
    a = _args(CASES[i], device)
    b = _clone(a)
    mo.made_sample_steps(*a)
    D = a[0].shape[1]
    for k in (3, 1, D - 4):
        cfg = list(b[11])
        cfg[1] = k
        mo.made_sample_steps(*b[:11], cfg, b[12])
    assert torch.equal(a[0], b[0]) and int(b[4][0]) == D
    torch.testing.assert_close(a[2], b[2], rtol=1e-12, atol=1e-12)


def test_opcheck(device):
    requires_kernel("made_sample_steps", device)
    a = _args(CASES[3], device, n=3, given=True)
    cfg = list(a[11])
    cfg[1] = 2
    a[11] = cfg
    torch.library.opcheck(torch.ops.fastar.made_sample_steps.default, tuple(a),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_input(device):
    a = _args(CASES[1], device)
    bad = _clone(a)
    bad[1] = bad[1][:, :, :-1].contiguous()
    with pytest.raises(ValueError, match="hidden"):
        mo.made_sample_steps(*bad)
    bad = _clone(a)
    bad[10] = bad[10][:-1]
    with pytest.raises(ValueError, match="pack"):
        mo.made_sample_steps(*bad)
    bad = _clone(a)
    bad[6] = bad[6] + 1.0
    with pytest.raises(ValueError, match="uniforms"):
        mo.made_sample_steps(*bad)
    bad = _clone(a)
    bad[4] += 1                                      # D steps from step 1 run past the end
    with pytest.raises(ValueError, match="past"):
        mo.made_sample_steps(*bad)
    bad = _clone(a)
    bad[-1] = -1.0
    with pytest.raises(ValueError, match="temperature"):
        mo.made_sample_steps(*bad)
    bad = _clone(a)
    bad[7] = torch.zeros_like(bad[0])
    with pytest.raises(ValueError, match="together"):
        mo.made_sample_steps(*bad)
    if "made_sample_steps" in __import__("fastar")._backend.CPU_KERNELS and torch.device(device).type == "cpu":
        bad = _clone(a)
        bad[2] = bad[2][:, :, :-1].contiguous()
        with pytest.raises(RuntimeError, match="acc"):
            torch.ops.fastar.made_sample_steps(*bad)
