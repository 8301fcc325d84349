"""gated_pixelcnn_step: the fused Gated PixelCNN pixel step against its PyTorch twin, the engine on the fused
path against the naive sampler and the per-op path, opcheck, torch.compile, bad input."""
from __future__ import annotations

import pytest
import torch

import fastar
from fastar import sampling
from fastar.models import GatedPixelCNN
from fastar.ops import gated_pixelcnn_step, gated_pixelcnn_step_ref
from fastar.ops import gated_pixelcnn as ps
from fastar.models.pixelcnn_cache import ImageInferenceCache as _CachedRun
from tests.conftest import requires_kernel


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(device, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return GatedPixelCNN(**kw).to(device, dtype).eval()


def _plan(model, n, shape, cond=None, prefix=None, mask=None, temperature=1.0, seed=1, record=False):
    return sampling.prepare(model, n, shape, cond, torch.Generator().manual_seed(seed), temperature, prefix, mask,
                            record=record)


def _walk(model, plan, fn):
    """Every step of a fused run with `fn` as the pixel step; returns (codes, per-step logits)."""
    run = _CachedRun(model, plan, fused=True)
    per_row = run.C * run.W
    rec = []
    with torch.no_grad():
        for t in range(plan.seq.steps):
            if t and t % per_row == 0:
                run._row()
            fn(*run._fused_args)
            rec.append(run.params.clone())
    return plan.values.clone(), torch.stack(rec), run


CASES = [
    # (model kwargs, shape, batch, cond kind, prefix)
    (dict(in_channels=1, levels=2, layers=3, channels=8), (5, 4), 5, None, False),
    (dict(in_channels=3, levels=256, layers=3, channels=6), (3, 4), 1, None, False),
    (dict(in_channels=3, levels=2, layers=2, channels=6), (4, 3), 5, "class", False),
    (dict(in_channels=1, levels=7, layers=3, channels=4, first_kernel_size=5), (4, 5), 1, "map", False),
    (dict(in_channels=3, levels=5, layers=2, channels=6), (4, 4), 5, "both", True),
]


def _cond(kind, n, shape, device, dtype):
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 3, (n,), generator=g).to(device)
    cmap = torch.randn(n, 2, *shape, generator=g, dtype=torch.float64).to(device, dtype)
    return {None: None, "class": labels, "map": cmap, "both": (labels, cmap)}[kind]


def _case(i, device, dtype):
    kw, shape, n, kind, use_prefix = CASES[i]
    kw = dict(kw)
    if kind in ("class", "both"):
        kw["num_classes"] = 3
    if kind in ("map", "both"):
        kw["cond_channels"] = 2
    model = _model(device, dtype, **kw)
    cond = _cond(kind, n, shape, device, dtype)
    prefix = mask = None
    if use_prefix:
        g = torch.Generator().manual_seed(3)
        prefix = torch.randint(0, kw["levels"], (n, kw["in_channels"]) + shape, generator=g).to(device)
        mask = torch.rand(n, kw["in_channels"], *shape, generator=g).to(device) < 0.4
    return model, shape, n, cond, prefix, mask


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_equals_ref_float64(device, case):
    requires_kernel("gated_pixelcnn_step", device)
    model, shape, n, cond, prefix, mask = _case(case, device, torch.float64)
    plan = _plan(model, n, shape, cond, prefix, mask)
    xk, lk, rk = _walk(model, plan, torch.ops.fastar.gated_pixelcnn_step)
    xr, lr, rr = _walk(model, _plan(model, n, shape, cond, prefix, mask), ps._ref_impl)
    assert torch.equal(xk, xr)
    torch.testing.assert_close(lk, lr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rk.x_img, rr.x_img, rtol=0, atol=0)
    assert int(rk.run.counter[0]) == plan.seq.steps and int(rk.run.counter[1]) == 0
    if prefix is not None:
        m = mask.reshape(n, -1)
        assert torch.equal(xk[m], prefix.reshape(n, -1)[m])
    assert len(torch.unique(xk)) > 1


@pytest.mark.parametrize("case", [0, 1, 4])
def test_kernel_close_to_ref_float32(device, case):
    # One step from the same state (a float32 run may legitimately draw a different value on a
    # CDF boundary, after which the runs diverge): logits close, same draw and writes.
    requires_kernel("gated_pixelcnn_step", device)
    model, shape, n, cond, prefix, mask = _case(case, device, torch.float32)
    plan = _plan(model, n, shape, cond, prefix, mask)
    _, _, run = _walk(model, plan, torch.ops.fastar.gated_pixelcnn_step)
    run.run.counter[0] = plan.seq.steps // 2     # any state serves: both sides start from copies of it
    a = [x.clone() if isinstance(x, torch.Tensor) else x for x in run._fused_args]
    b = [x.clone() if isinstance(x, torch.Tensor) else x for x in run._fused_args]
    torch.ops.fastar.gated_pixelcnn_step(*a)
    ps._ref_impl(*b)
    torch.testing.assert_close(a[4], b[4], rtol=1e-4, atol=1e-4)          # logits
    for k in (0, 1, 2, 3):                                                  # image, row cache, codes, step
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_cached_fused_equals_naive_float64(device, case):
    model, shape, n, cond, prefix, mask = _case(case, device, torch.float64)
    xn, ln = sampling.naive_sample(model, _plan(model, n, shape, cond, prefix, mask, record=True))
    xf, lf = sampling.cached_sample(model, _plan(model, n, shape, cond, prefix, mask, record=True), fused=True)
    xu = sampling.cached_sample(model, _plan(model, n, shape, cond, prefix, mask), fused=False)
    assert torch.equal(xn, xf) and torch.equal(xu, xf)
    torch.testing.assert_close(lf, ln, rtol=1e-8, atol=1e-8)


def test_temperature_zero_and_other_temperature(device):
    model, shape, n, cond, prefix, mask = _case(1, device, torch.float64)
    for temp in (0.0, 0.7):
        xn = sampling.naive_sample(model, _plan(model, 2, shape, temperature=temp))
        xf = sampling.cached_sample(model, _plan(model, 2, shape, temperature=temp, seed=1), fused=True)
        assert torch.equal(xn, xf)
    greedy = sampling.cached_sample(model, _plan(model, 2, shape, temperature=0.0, seed=9), fused=True)
    assert torch.equal(greedy[0], greedy[1])


def test_engine_uses_the_fused_op_by_default(device):
    # So the engine tests in test_sampling.py run the fused path wherever its kernel is built.
    requires_kernel("gated_pixelcnn_step", device)
    model = _model(device, in_channels=1, levels=2, layers=2, channels=4)
    plan = _plan(model, 2, (3, 3))
    assert _CachedRun(model, plan).draws
    with fastar.backend("reference"):
        assert not _CachedRun(model, plan).draws
    assert not _CachedRun(model, plan, fused=False).draws


def _op_args(device, dtype=torch.float64):
    """The op's full argument tuple (its (pack, config) form) for a tiny conditional model with a prefix."""
    model = _model(device, dtype, in_channels=3, levels=4, layers=2, channels=6, num_classes=3, cond_channels=2)
    n, shape = 2, (3, 3)
    g = torch.Generator().manual_seed(4)
    cond = (torch.tensor([0, 2], device=device), torch.randn(n, 2, *shape, generator=g, dtype=dtype).to(device))
    prefix = torch.zeros(n, 3, *shape, dtype=torch.int64, device=device)
    mask = torch.zeros(n, 3, *shape, dtype=torch.bool, device=device)
    mask[:, :, 0, 0] = True
    return list(_CachedRun(model, _plan(model, n, shape, cond, prefix, mask), fused=True)._fused_args)


def _named(op_args):
    """The public function's 24 named arguments from the op's (pack, config) form: the documented layouts of
    csrc/fastar.cpp's schema, read back independently of fastar.ops.gated_pixelcnn's helpers."""
    image, row_cache, codes, step, logits, noise, links, prefix, given, pack, config, temperature = op_args
    h_w, h_b, so_w, so_b, head1_w, head1_b, head2_w, head2_b, class_bias, cond_map, map_w = pack
    levels, t0, t1, *residual = config
    return [image, row_cache, codes, step, logits, noise, links, class_bias, cond_map, map_w, prefix, given, h_w,
            h_b, so_w, so_b, head1_w, head1_b, head2_w, head2_b, [t0, t1], residual, levels, temperature]


def _args(device, dtype=torch.float64):
    """The public function's named arguments (see _op_args)."""
    return _named(_op_args(device, dtype))


def test_named_and_packed_forms_agree(device):
    """The public door (named arguments, packed once in Python) and the op's own (pack, config) form draw
    the same step."""
    requires_kernel("gated_pixelcnn_step", device)
    a = _op_args(device)
    b = _args(device)
    torch.ops.fastar.gated_pixelcnn_step(*a)
    gated_pixelcnn_step(*b)
    for k in (0, 1, 2, 3, 4):                                     # image, row cache, codes, step, logits
        assert torch.equal(a[k], b[k])
    assert int(a[3][0]) == 1


def test_opcheck(device):
    requires_kernel("gated_pixelcnn_step", device)
    torch.library.opcheck(torch.ops.fastar.gated_pixelcnn_step, tuple(_op_args(device)))


def test_torch_compile_fullgraph(device):
    requires_kernel("gated_pixelcnn_step", device)
    a, b = _args(device), _args(device)

    def steps(args):
        for _ in range(3):
            gated_pixelcnn_step(*args)
        return args[2].clone()

    eager = steps(a)
    compiled = torch.compile(steps, fullgraph=True)(b)
    assert torch.equal(eager, compiled) and int(b[3][0]) == 3


def test_public_fn_and_ref_agree_and_advance(device):
    a, b = _args(device), _args(device)
    gated_pixelcnn_step(*a)
    gated_pixelcnn_step_ref(*b)
    assert int(a[3][0]) == int(b[3][0]) == 1
    assert torch.equal(a[2], b[2])


def test_bad_input(device):
    args = _args(device)
    bad = list(args)
    bad[13] = args[13].float()                                    # h_b float32, the rest float64
    with pytest.raises(TypeError, match="must match the weights' dtype"):
        gated_pixelcnn_step(*bad)
    bad = list(args)
    bad[4] = args[4][:, :2].contiguous()                          # logits too narrow
    with pytest.raises(ValueError, match=r"logits must have shape \[2, 4\]"):
        gated_pixelcnn_step(*bad)
    bad = list(args)
    bad[11] = None                                                # prefix without given
    with pytest.raises(ValueError, match="prefix and given come together"):
        gated_pixelcnn_step(*bad)
    bad = list(args)
    bad[3] = torch.zeros(1, dtype=torch.int64, device=device)
    with pytest.raises(TypeError, match=r"step must be a \(2,\) int64"):
        gated_pixelcnn_step(*bad)
    bad = list(args)
    bad[22] = 1
    with pytest.raises(ValueError, match="levels must be an int >= 2"):
        gated_pixelcnn_step(*bad)
    bad = list(args)
    bad[20] = [1]
    with pytest.raises(ValueError, match="taps must be two positive ints"):
        gated_pixelcnn_step(*bad)
    bad = list(args)
    bad[8] = None                                                 # map_w without cond_map
    with pytest.raises(ValueError, match="cond_map and map_w come together"):
        gated_pixelcnn_step(*bad)
    with pytest.raises(ValueError, match="temperature"):
        gated_pixelcnn_step(*args[:-1], -1.0)


def _kernel_bad_input_cases(device, op=None):
    """The compiled kernel's own checks (a caller that bypasses the Python side). `op`: how to call it."""
    args = _op_args(device)
    op = op or torch.ops.fastar.gated_pixelcnn_step
    bad = list(args)
    bad[1] = args[1][:, :1].clone()
    with pytest.raises(RuntimeError, match="row_cache must have shape"):
        op(*bad)
    bad = list(args)
    bad[9] = [args[9][0][:-1].clone()] + list(args[9][1:])          # pack[0]: h_w one value short
    with pytest.raises(RuntimeError, match="h_w must be 1-D holding"):
        op(*bad)
    bad = list(args)
    bad[8] = args[8].long()
    with pytest.raises(RuntimeError, match="given must be a contiguous"):
        op(*bad)
    bad = list(args)
    bad[10] = list(args[10][:3]) + [0]                              # config: one residual flag for 2 blocks
    with pytest.raises(RuntimeError, match="residual must list 2 flags"):
        op(*bad)
    bad = list(args)
    bad[9] = [None] + list(args[9][1:])
    with pytest.raises(RuntimeError, match=r"pack\[0\] \(h_w\) must be a tensor"):
        op(*bad)
    bad = list(args)
    bad[9] = list(args[9][:-1])
    with pytest.raises(RuntimeError, match="pack must hold 11 entries"):
        op(*bad)
    bad = list(args)
    bad[10] = [4, 1]
    with pytest.raises(RuntimeError, match="config must hold"):
        op(*bad)
    return args


def test_kernel_bad_input(device):
    requires_kernel("gated_pixelcnn_step", device)
    if device.type == "cuda":
        # On the H200 (torch 2.11) this crashed the whole pytest process with SIGSEGV at the first
        # bad input, losing the file's later tests. Run it in a child process that prints C++ stack
        # traces on a fatal signal: a crash is then this test's failure, with the native frames.
        import os
        import subprocess
        import sys
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = ("import torch\n"
                "f = getattr(torch._C, '_set_print_stack_traces_on_fatal_signal', None)\n"
                "f and f(True)\n"
                "from tests.ops.test_pixel_step import _kernel_bad_input_cases\n"
                "_kernel_bad_input_cases(torch.device('cuda'))\n"
                "print('bad-input cases raised as expected')\n")
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "raised as expected" in proc.stdout, (
            f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        return
    args = _kernel_bad_input_cases(device)
    args[3][0] = 27                                           # past the 3 x 3 x 3 sub-pixels
    with pytest.raises(RuntimeError, match="step counter is 27"):
        torch.ops.fastar.gated_pixelcnn_step(*args)


def test_cuda_kernel_checks_on_cpu_tensors():
    """The CUDA kernel's host-side argument checks (nvcc-compiled, csrc/cuda/pixel_step.cu) reached
    on a machine without a GPU: redispatched straight to the CUDA kernel with CPU tensors, every
    bad input must raise its sentence before anything touches a device (the checks come first)."""
    from fastar import _backend
    if "gated_pixelcnn_step" not in _backend.CUDA_KERNELS:
        pytest.skip("this build of fastar._C has no CUDA kernels")
    ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    _kernel_bad_input_cases(torch.device("cpu"), lambda *a: torch.ops.fastar.gated_pixelcnn_step.default.redispatch(ks, *a))


def test_fused_true_rejects_unfusable_model():
    model = _model("cpu", in_channels=1, levels=2, layers=2, channels=4)
    model.blocks[1].h_conv = torch.nn.Conv2d(4, 8, (1, 5), padding=(0, 2)).double()
    model.blocks[1].h_mask = torch.ones(8, 4, 1, 5, dtype=torch.float64)   # taps right of the centre live
    with pytest.raises(ValueError, match="does not fit the fused op"):
        _CachedRun(model, _plan(model, 1, (2, 2)), fused=True)


def test_cuda_graph_fused_matches_eager(device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    model = _model(device, torch.float32, in_channels=3, levels=256, layers=4, channels=12)
    plans = [sampling.prepare(model, 6, (5, 4), None, torch.Generator(device).manual_seed(3)) for _ in range(2)]
    a = sampling.cached_sample(model, plans[0], cuda_graphs=True, fused=True)
    b = sampling.cached_sample(model, plans[1], cuda_graphs=False, fused=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("case", [0, 1, 3])
def test_kernel_draws_the_ref_index_at_cdf_boundaries_float64(case):
    """CPU float64: every step's uniform is put right at a partial sum of the unnormalised CDF of
    a first pass's logits (the one rule's arithmetic); each kernel draw must then be
    categorical_sample_ref's on the kernel's own logits (the ref walk's logits differ in the last
    bits, so on a boundary it may rightly draw the neighbour)."""
    from fastar.ops.mixture import categorical_sample_ref
    from tests.ops.test_mixture import boundary_uniforms
    dev = torch.device("cpu")
    requires_kernel("gated_pixelcnn_step", dev)
    model, shape, n, cond, prefix, mask = _case(case, dev, torch.float64)
    plan = _plan(model, n, shape, cond, prefix, mask)
    _, lk, _ = _walk(model, plan, torch.ops.fastar.gated_pixelcnn_step)
    two = model.levels == 2
    C, H, W = plan.seq.shape
    T = plan.seq.steps

    def full(lg):  # a binary row is the two categories (0, logit)
        return torch.cat([torch.zeros_like(lg), lg], 1) if two else lg

    g = torch.Generator().manual_seed(case)
    for t in range(T):
        plan.noise[t, :, 0] = boundary_uniforms(full(lk[t]), plan.temperature, g)
    plan2 = _plan(model, n, shape, cond, prefix, mask)
    plan2.noise.copy_(plan.noise)
    xk, lk2, _ = _walk(model, plan2, torch.ops.fastar.gated_pixelcnn_step)
    for t in range(T):  # step t draws channel t % C of pixel t // C
        got = xk.reshape(n, -1)[:, (t % C) * H * W + t // C]
        want = categorical_sample_ref(full(lk2[t]), 1, noise=plan.noise[t, :, 0], temperature=plan.temperature)
        if prefix is None:
            assert torch.equal(got, want), f"step {t}"
