"""``pixelcnnpp_ul_step``: the compiled PixelCNN++ pixel step against its reference twin, over model
shapes (odd image sizes, depths, classes), dtypes and every pixel of an image; opcheck; torch.compile."""
from __future__ import annotations

import pytest
import torch

from fastar import _backend, sampling
from fastar.models import PixelCNNpp
from fastar.ops import pixelcnnpp_ul_step, pixelcnnpp_ul_step_ref

pytestmark = pytest.mark.usefixtures("one_thread")

needs_kernel = pytest.mark.skipif(not _backend.has_ops("pixelcnnpp_ul_step"),
                                  reason="fastar._C was built without pixelcnnpp_ul_step")

CASES = [  # (in_channels, nr_resnet, nr_filters, K, num_classes, H, W)
    (3, 1, 4, 2, None, 4, 4),
    (1, 2, 6, 3, 3, 5, 7),
    (3, 1, 8, 2, None, 9, 6),
]


def _caches(case, dtype, n=3):
    C, nr, nf, K, classes, H, W = case
    torch.manual_seed(0)
    model = PixelCNNpp(C, nr, nf, K, dropout=0.0, num_classes=classes).to(dtype).eval()
    cond = None if classes is None else torch.arange(n) % classes
    runs = [sampling.prepare(model, n, (H, W), cond, torch.Generator().manual_seed(1)) for _ in range(2)]
    return model, [model.allocate_inference_cache(r) for r in runs], runs


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_kernel_equals_reference_at_every_pixel(case, dtype):
    model, (a, b), runs = _caches(case, dtype)
    H, W = runs[0].seq.shape[1:]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in range(H * W):
            i, j = divmod(t, W)
            if j == 0:
                a._rows(i)
                b._rows(i)
            torch.ops.fastar.pixelcnnpp_ul_step(a.maps, a.weights, a.program, i, j, a.out_buf)
            pixelcnnpp_ul_step_ref(b.maps, b.weights, b.program, i, j, b.out_buf)
            torch.testing.assert_close(a.out_buf, b.out_buf, **tol)
            v = torch.randint(0, 2, (3, model.in_channels), generator=g).to(dtype) * 2 - 1
            a.update(None, t, v)
            b.update(None, t, v)
        for ma, mb in zip(a.maps, b.maps):
            torch.testing.assert_close(ma, mb, **tol)


@pytest.mark.parametrize("case", CASES[:2], ids=[str(c) for c in CASES[:2]])
def test_program_path_equals_the_per_op_cache(case):
    """The program (kernel or twin) and the cache's own torch-op position work give the same parameters."""
    model, _, _ = _caches(case, torch.float64)
    H, W = case[5:]
    cond = None if case[4] is None else torch.arange(3) % case[4]
    out = []
    for fused in (None, False):
        run = sampling.prepare(model, 3, (H, W), cond, torch.Generator().manual_seed(3), record=True)
        out.append(sampling.cached_sample(model, run, fused=fused))
    assert torch.equal(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-12, atol=1e-12)


@needs_kernel
def test_opcheck():
    _, (a, _), _ = _caches(CASES[1], torch.float64)
    a._rows(0)
    args = (a.maps, a.weights, a.program, 0, 0, a.out_buf)
    torch.library.opcheck(torch.ops.fastar.pixelcnnpp_ul_step, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@needs_kernel
def test_torch_compile():
    _, (a, b), _ = _caches(CASES[0], torch.float64)
    for c in (a, b):
        c._rows(0)
        c._rows(1)

    def step(maps, weights, out):
        torch.ops.fastar.pixelcnnpp_ul_step(maps, weights, a.program, 1, 2, out)
        return out * 1.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(a.maps, a.weights, a.out_buf)
    pixelcnnpp_ul_step_ref(b.maps, b.weights, b.program, 1, 2, b.out_buf)
    torch.testing.assert_close(got, b.out_buf, rtol=1e-12, atol=1e-12)


def test_public_door_checks_then_runs():
    _, (a, b), _ = _caches(CASES[0], torch.float64)
    pixelcnnpp_ul_step(a.maps, a.weights, a.program, 0, 0, a.out_buf)
    pixelcnnpp_ul_step_ref(b.maps, b.weights, b.program, 0, 0, b.out_buf)
    torch.testing.assert_close(a.out_buf, b.out_buf, rtol=1e-12, atol=1e-12)


@needs_kernel
def test_kernel_refuses_a_program_that_does_not_fit_its_tensors():
    """Shapes are checked in C++ on every call: a wrong weight is an error, never an out-of-bounds read."""
    _, (a, _), _ = _caches(CASES[0], torch.float64)
    bad = list(a.weights)
    k = a.program[7 + 14]                      # the first BLOCK's conv_in weight
    bad[k] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="BLOCK conv_in weight must be"):
        torch.ops.fastar.pixelcnnpp_ul_step(a.maps, bad, a.program, 0, 0, a.out_buf)
    small = [m[:, :, :2].contiguous() if m.shape[2] > 2 else m for m in a.maps]
    with pytest.raises(RuntimeError, match="outside|match|one size"):
        torch.ops.fastar.pixelcnnpp_ul_step(small, a.weights, a.program, 3, 0, a.out_buf)


@needs_kernel
def test_kernel_bits_do_not_depend_on_the_thread_count():
    """Batch rows are split over threads; each row's sums run in one order whatever rows share a tile. The op
    itself at one and at two threads over a whole image (the engine's policy would run a step on one thread
    unless the op is known neutral, so sampling at two threads would not test it): tests/test_threads.py's
    walk, float64 and float32."""
    from tests.test_threads import _pixelcnnpp_fused_walk, _same_bits

    for dtype in (torch.float64, torch.float32):
        a, b = (_pixelcnnpp_fused_walk(dtype, t, None, n=7) for t in (1, 2))
        assert _same_bits(a, b), dtype
