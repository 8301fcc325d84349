"""One tiny case per CUDA kernel, each checked against its PyTorch reference: the program that
scripts/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck, synccheck).

A pytest process under the sanitizer is slow (collection, fixtures, hundreds of cases, every
torch kernel instrumented), so this is a plain script: import torch once, run each case once,
print one line per case:

    START <case>                  (flushed before the case, so a hang names its case)
    PASS <case> (<seconds> s)
    FAIL <case>: <error>

and exit 1 when any case failed (0 otherwise). Without a GPU it prints "no GPU" and exits 0.

Every op with a CUDA kernel (``m.impl`` in ``csrc/cuda/*.cu``) must be covered by a case: a
kernel added without one makes this script print ``FAIL coverage`` (and
tests/package/test_gpu_check.py fail on any machine), so new kernels cannot skip the sanitizer.

    python scripts/gpu_sanitizer_cases.py [--list] [--coverage] [CASE ...]
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the in-place build of the checkout, not some installed fastar

# name -> (function, ops it covers). Order matters: the persistent kernels spin on a grid barrier,
# the likeliest cases to stall under a sanitizer, so they run last (the PixelRNN scans, then the
# persistent WaveNet kernel) and cannot hide the verdicts of the others.
CASES: dict[str, tuple] = {}
# "cuda" for real; `--device cpu` runs the same cases on the CPU kernels, a dry run that checks the
# cases themselves (arguments, tolerances) on a machine without a GPU.
DEV = "cuda"


def case(name: str, covers: tuple[str, ...]):
    def deco(fn):
        CASES[name] = (fn, covers)
        return fn
    return deco


def cuda_ops_in_sources(root: str = ROOT) -> set[str]:
    """The ops that csrc/cuda registers a CUDA kernel for (read from the sources: works without a GPU
    and without a CUDA build)."""
    ops = set()
    for path in glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")):
        with open(path) as f:
            text = f.read()
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(\s*fastar\s*,\s*CUDA\s*,\s*\w+\s*\)\s*\{(.*?)\n\}", text + "\n}",
                                re.S):
            ops.update(re.findall(r"\.impl\(\s*\"(\w+)\"", block))
    return ops


def uncovered(root: str = ROOT) -> list[str]:
    covered = {op for _, covers in CASES.values() for op in covers}
    return sorted(cuda_ops_in_sources(root) - covered)


# ------------------------------------------------------------------------------------------------
# The cases. Each builds its inputs on cuda, runs the kernel (backend "kernel", so a missing
# kernel raises instead of silently running the reference) and compares with the reference.


def _sync():
    import torch
    if DEV == "cuda":
        torch.cuda.synchronize()


def _kernel():
    import fastar
    return fastar.backend("kernel")


def _close(a, b, rtol=1e-4, atol=1e-4, what=""):
    import torch
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@case("masked_conv2d_fwd_bwd", ("masked_conv2d", "masked_conv2d_backward"))
def _masked_conv2d():
    import torch
    from fastar import masks
    from fastar.ops import masked_conv2d, masked_conv2d_ref
    g = torch.Generator().manual_seed(0)
    # 3 colour groups, a 5x5 mask A and an odd size: the tiled paths and their edges in one launch
    x = torch.randn(2, 3, 9, 7, generator=g)
    w = torch.randn(12, 3, 5, 5, generator=g) * 0.2
    b = torch.randn(12, generator=g)
    m = masks.causal_mask("A", 12, 3, 5, 3)
    go = torch.randn(2, 12, 9, 7, generator=g)
    dtypes = ((torch.float32, 1e-4), (torch.float16, 2e-2)) if DEV == "cuda" else ((torch.float32, 1e-4),)
    for dtype, tol in dtypes:
        xs = [t.to(DEV, dtype).requires_grad_(True) for t in (x, w, b)]
        xr = [t.to(DEV, dtype).requires_grad_(True) for t in (x, w, b)]
        mc = m.to(DEV, dtype)
        with _kernel():
            out = masked_conv2d(*xs[:3], mc)
        ref = masked_conv2d_ref(*xr[:3], mc)
        _close(out, ref, tol, tol, f"{dtype} forward")
        gk = torch.autograd.grad(out, xs, go.to(DEV, dtype))
        gr = torch.autograd.grad(ref, xr, go.to(DEV, dtype))
        for name, a, r in zip(("grad x", "grad w", "grad b"), gk, gr):
            _close(a, r, tol * 10, tol * 10, f"{dtype} {name}")


@case("masked_conv2d_at", ("masked_conv2d_at",))
def _masked_conv2d_at():
    import torch
    from fastar import masks
    from fastar.ops import masked_conv2d_at, masked_conv2d_at_ref
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 5, 7, generator=g).to(DEV)
    w = torch.randn(6, 4, 3, 3, generator=g).to(DEV)
    b = torch.randn(6, generator=g).to(DEV)
    m = masks.mask_b(6, 4, 3).to(DEV)
    pos = torch.tensor([[0, 0], [2, 3], [2, 3], [4, 6]], device=DEV)  # a repeat and both corners
    x_new = torch.randn(2, 4, 4, generator=g).to(DEV)
    x_new[:, :, 2] = x_new[:, :, 1]
    ck, cr = x.clone(), x.clone()
    with _kernel():
        out = masked_conv2d_at(ck, x_new, w, b, m, pos)
    ref = masked_conv2d_at_ref(cr, x_new, w, b, m, pos)
    _close(ck, cr, 0, 0, "cache")
    _close(out, ref, what="output")


def _dml_data(b, c, h, w, k, seed):
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, c, h, w), generator=g).double() / 255 * 2 - 1
    p = torch.randn(b, (3 if c == 1 else 10) * k, h, w, generator=g, dtype=torch.float64)
    return x.to(DEV), p.to(DEV)


@case("dml_nll_fwd_bwd", ("discretized_mix_logistic_nll", "discretized_mix_logistic_nll_backward"))
def _dml_nll():
    import torch
    from fastar.ops import discretized_mix_logistic_nll, discretized_mix_logistic_nll_ref
    x, p = _dml_data(3, 3, 5, 4, 5, seed=2)
    for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 1e-3)):
        pk = p.to(dtype).requires_grad_(True)
        pr = p.to(dtype).requires_grad_(True)
        with _kernel():
            nk = discretized_mix_logistic_nll(x.to(dtype), pk, 5, reduction="none")
        nr = discretized_mix_logistic_nll_ref(x.to(dtype), pr, 5, reduction="none")
        _close(nk, nr, tol, tol, f"{dtype} nll")
        (gk,) = torch.autograd.grad(nk.sum(), pk)
        (gr,) = torch.autograd.grad(nr.sum(), pr)
        _close(gk, gr, tol, tol, f"{dtype} grad params")


@case("sample_dml", ("sample_discretized_mix_logistic",))
def _dml_sample():
    import torch
    from fastar.ops import sample_discretized_mix_logistic, sample_discretized_mix_logistic_ref
    _, p = _dml_data(3, 3, 5, 4, 5, seed=3)
    u = torch.rand(3, 4, 5, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEV)
    with _kernel():
        got = sample_discretized_mix_logistic(p, 5, noise=u, temperature=0.8)
    want = sample_discretized_mix_logistic_ref(p, 5, noise=u, temperature=0.8)
    if not torch.equal(got, want):
        raise AssertionError(f"float64 draws differ at {(got != want).sum().item()} of {got.numel()} places")


@case("categorical_sample", ("categorical_sample",))
def _categorical():
    import torch
    from fastar.ops import categorical_sample, categorical_sample_ref
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 256, 5, 4, generator=g, dtype=torch.float64) * 3).to(DEV)
    u = torch.rand(3, 5, 4, generator=g, dtype=torch.float64).to(DEV)
    for temperature, top_k in ((1.0, None), (0.7, 3), (0.0, None)):
        with _kernel():
            got = categorical_sample(logits, 1, noise=u, temperature=temperature, top_k=top_k)
        want = categorical_sample_ref(logits, 1, noise=u, temperature=temperature, top_k=top_k)
        if not torch.equal(got, want):
            raise AssertionError(f"T={temperature} top_k={top_k}: {(got != want).sum().item()} draws differ")


@case("causal_conv1d_update", ("causal_conv1d_update",))
def _causal_conv1d_update():
    import torch
    from fastar.ops import causal_conv1d_update, causal_conv1d_update_ref
    g = torch.Generator().manual_seed(6)
    B, C_in, C_out, k, d, T = 3, 5, 7, 3, 2, 7
    xs = torch.randn(B, C_in, T, generator=g).to(DEV)
    w = torch.randn(C_out, C_in, k, generator=g).to(DEV)
    b = torch.randn(C_out, generator=g).to(DEV)
    sk = torch.zeros(B, C_in, (k - 1) * d, device=DEV)
    sr = sk.clone()
    for t in range(T):
        with _kernel():
            yk = causal_conv1d_update(xs[:, :, t], sk, w, b, d, t)
        yr = causal_conv1d_update_ref(xs[:, :, t], sr, w, b, d, torch.tensor(t, device=DEV))
        _close(yk, yr, what=f"output at t={t}")
    _close(sk, sr, 0, 0, "state")


def _wavenet_case(B=3, T=8, L=4, k=2, R=8, D=6, S=16, A=32, seed=7):
    import torch
    from fastar.ops.wavenet import queue_sizes
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.5):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).float().to(DEV)

    dil = [1, 2, 4, 1][:L]
    w = [r(A, R), r(R), r(L, k, R, 2 * D), r(L, 2 * D), r(L, D, R + S), r(L, R + S), r(S, S, scale=0.3), r(S),
         r(S, A), r(A)]
    st = dict(samples=torch.randint(0, A, (B, T), generator=g).to(DEV),
              queues=torch.zeros(B, sum(queue_sizes(dil, k)), R, device=DEV),
              position=torch.zeros(1, dtype=torch.int64, device=DEV),
              logits=torch.zeros(B, A, device=DEV),
              noise=torch.rand(B, T, generator=g).to(DEV))
    cond = r(B, T, L, 2 * D)  # local conditioning: the widest argument list
    return st, cond, w, dil


def _wavenet_on(path: str):
    import torch
    from fastar.ops import wavenet_step, wavenet_step_ref
    os.environ["FASTAR_WAVENET_CUDA_PATH"] = path  # read per call by the op: a forced path raises, never falls back
    try:
        st, cond, w, dil = _wavenet_case()
        sk = {k: v.clone() for k, v in st.items()}
        sr = {k: v.clone() for k, v in st.items()}

        def call(fn, s, steps):
            return fn(s["samples"], s["queues"], s["position"], s["logits"], s["noise"], cond, *w, dil, 2, 1.0, 0,
                      steps)

        with _kernel():
            call(wavenet_step, sk, 1)
            call(wavenet_step, sk, 4)  # several steps in one launch
        call(wavenet_step_ref, sr, 5)
        _sync()
        _close(sk["logits"], sr["logits"], 1e-3, 1e-3, "logits")
        _close(sk["queues"], sr["queues"], 1e-3, 1e-3, "queues")
        if not torch.equal(sk["samples"], sr["samples"]):
            raise AssertionError("samples differ")
        if int(sk["position"]) != 5:
            raise AssertionError(f"position {int(sk['position'])}, expected 5")
    finally:
        os.environ.pop("FASTAR_WAVENET_CUDA_PATH", None)


@case("wavenet_step_blocks", ("wavenet_step",))
def _wavenet_blocks():
    _wavenet_on("blocks")


@case("gated_pixelcnn_step", ("gated_pixelcnn_step",))
def _pixel_step():
    import torch
    import fastar
    from fastar import sampling
    from fastar.models import GatedPixelCNN
    torch.manual_seed(0)
    model = GatedPixelCNN(in_channels=3, levels=5, layers=2, channels=6).to(DEV, torch.float64).eval()

    def draw(cuda_graphs):
        plan = sampling.prepare(model, 2, (3, 4), None, torch.Generator().manual_seed(1))
        return sampling.cached_sample(model, plan, cuda_graphs=cuda_graphs, fused=True)

    # CUDA graphs need the caching allocator, which memcheck's run turns off (so that every
    # tensor is its own allocation): the replay is checked by the other two tools then.
    graphs = DEV == "cuda" and os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") != "1"
    with _kernel():
        eager = draw(False)
        graphed = draw(True) if graphs else eager  # the same steps captured once and replayed
    with fastar.backend("reference"):
        ref = draw(False)
    if not torch.equal(eager, ref):
        raise AssertionError(f"kernel and reference images differ at {(eager != ref).sum().item()} values")
    if not torch.equal(graphed, eager):
        raise AssertionError("CUDA-graph replay differs from eager steps")


@case("pixelrnn_step", ("pixelrnn_step",))
def _pixelrnn_step():
    import torch
    import fastar
    from fastar import sampling
    from fastar.models import PixelRNN
    for kind in ("diagonal", "row"):
        torch.manual_seed(0)
        model = PixelRNN(kind, in_channels=3, levels=5, layers=2, hidden=12).to(DEV, torch.float64).eval()

        def draw():
            plan = sampling.prepare(model, 2, (3, 4), None, torch.Generator().manual_seed(1))
            return sampling.cached_sample(model, plan, fused=True)

        with _kernel():
            got = draw()
        with fastar.backend("reference"):
            ref = draw()
        if not torch.equal(got, ref):
            raise AssertionError(f"{kind}: kernel and reference images differ at {(got != ref).sum().item()} values")


def _scan_dtypes():
    import torch
    # bfloat16 only has a CUDA kernel (the CPU kernels are float32 / float64)
    return ((torch.float32, 1e-4, 1e-3), (torch.bfloat16, 5e-2, 1e-1)) if DEV == "cuda" else \
        ((torch.float32, 1e-4, 1e-3),)


@case("made_sample_steps", ("made_sample_steps",))
def _made():
    import warnings

    import torch
    import fastar
    from fastar.models import MADE
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MADE(7, [6, 9], levels=3, num_masks=2, natural_ordering=True, connectivity="agnostic",
                     direct=True).to(DEV, torch.float64).eval()
    prefix = torch.randint(0, 3, (4, 7), device=DEV)
    mask = torch.rand(4, 7, device=DEV) < 0.3

    def draw():
        return model.sample(4, None, generator=torch.Generator().manual_seed(1), prefix=prefix, mask=mask,
                            progress=False)

    with _kernel():
        got = draw()
    with fastar.backend("reference"):
        ref = draw()
    if not torch.equal(got, ref):
        raise AssertionError(f"kernel and reference samples differ at {(got != ref).sum().item()} values")


@case("skew_unskew", ("skew", "unskew"))
def _skew_unskew():
    import torch
    from fastar.ops import skew, skew_ref, unskew, unskew_ref
    g = torch.Generator().manual_seed(8)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for shape in ((2, 3, 4, 5), (1, 2, 5, 1), (1, 1, 1, 4)):  # wide, tall (W = 1), one row
            x = torch.randn(*shape, generator=g).to(DEV, dtype).requires_grad_(True)
            with _kernel():
                y = skew(x)
                back = unskew(y)
                (gx,) = torch.autograd.grad(back, x, torch.ones_like(back))  # through both kernels
            _close(y, skew_ref(x.detach()), 0, 0, f"{dtype} {shape} skew")
            _close(back, x.detach(), 0, 0, f"{dtype} {shape} unskew(skew)")
            _close(unskew(y.detach()), unskew_ref(y.detach()), 0, 0, f"{dtype} {shape} unskew")
            _close(gx, torch.ones_like(gx), 0, 0, f"{dtype} {shape} grad")


def _scan_case(kind, B, hid, H, W, k=3, states=True, seed=9):
    """One forward + backward of a scan kernel against the reference, every dtype of _scan_dtypes."""
    import torch
    from fastar.ops import diagonal_lstm_scan, diagonal_lstm_scan_ref, row_lstm_scan, row_lstm_scan_ref
    g = torch.Generator().manual_seed(seed)
    diag = kind == "diagonal"
    args = [torch.randn(B, 4 * hid, H, W, generator=g), torch.randn(4 * hid, hid, 2 if diag else k, generator=g) * 0.3,
            torch.randn(4 * hid, generator=g)]
    if diag and states:
        args += [torch.randn(B, hid, H, generator=g), torch.randn(B, hid, H, generator=g)]
    gh, gc = torch.randn(B, hid, H, W, generator=g), torch.randn(B, hid, H, W, generator=g)
    fn, ref = (diagonal_lstm_scan, diagonal_lstm_scan_ref) if diag else (row_lstm_scan, row_lstm_scan_ref)
    for dtype, ftol, btol in _scan_dtypes():
        xk = [a.to(DEV, dtype).requires_grad_(True) for a in args]
        # the reference in float64 on the same (rounded) values (float64: never TF32, which cuDNN
        # may use for the row reference's float32 conv1d)
        xr = [a.to(DEV, dtype).double().requires_grad_(True) for a in args]
        with _kernel():
            hk, ck = fn(*xk)
            gk = torch.autograd.grad((hk, ck), xk, (gh.to(DEV, dtype), gc.to(DEV, dtype)))
        hr, cr = ref(*xr)
        gr = torch.autograd.grad((hr, cr), xr, (gh.to(DEV, dtype).double(), gc.to(DEV, dtype).double()))
        what = f"{kind} {dtype} B={B} hid={hid} {H}x{W}"
        _close(hk.double(), hr, ftol, ftol, f"{what} h")
        _close(ck.double(), cr, ftol, ftol, f"{what} c")
        for name, a, r in zip(("is_map", "w_ss", "bias", "h0", "c0"), gk, gr):
            _close(a.double(), r, btol, btol, f"{what} grad {name}")


@case("diagonal_lstm_scan_fwd_bwd", ("diagonal_lstm_scan", "diagonal_lstm_scan_backward"))
def _diagonal_scan():
    _scan_case("diagonal", 2, 5, 4, 6)             # hidden 5: a partial unit tile; more diagonals than rows
    _scan_case("diagonal", 1, 3, 5, 1, states=False)  # W = 1: each diagonal one cell


@case("row_lstm_scan_fwd_bwd", ("row_lstm_scan", "row_lstm_scan_backward"))
def _row_scan():
    _scan_case("row", 2, 5, 4, 6, k=3)
    _scan_case("row", 1, 3, 3, 2, k=5)  # kernel wider than the row: zero padding on both sides


@case("lstm_scan_steps_path", ("diagonal_lstm_scan", "diagonal_lstm_scan_backward", "row_lstm_scan",
                               "row_lstm_scan_backward"))
def _scan_steps_path():
    # The fallback of devices without cooperative launches: one launch per diagonal / row.
    os.environ["FASTAR_LSTM_SCAN_CUDA_PATH"] = "steps"  # read per call by the ops
    try:
        _scan_case("diagonal", 2, 5, 4, 6, seed=10)
        _scan_case("row", 2, 5, 4, 6, k=3, seed=11)
    finally:
        os.environ.pop("FASTAR_LSTM_SCAN_CUDA_PATH", None)


@case("wavenet_step_persistent", ("wavenet_step",))
def _wavenet_persistent():
    _wavenet_on("persistent")


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", help=f"cases to run (default: all): {', '.join(CASES)}")
    ap.add_argument("--list", action="store_true", help="print the case names and the ops each covers, then exit")
    ap.add_argument("--coverage", action="store_true",
                    help="only check that every CUDA kernel in csrc/cuda has a case (no GPU needed)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a dry run of the cases on the CPU kernels (default: cuda)")
    args = ap.parse_args(argv)
    if args.list:
        for name, (_, covers) in CASES.items():
            print(f"{name}: {', '.join(covers)}")
        return 0
    missing = uncovered()
    if missing:
        print(f"FAIL coverage: no sanitizer case for the CUDA kernel(s) {', '.join(missing)}: "
              f"add one to scripts/gpu_sanitizer_cases.py", flush=True)
    if args.coverage:
        if not missing:
            print(f"PASS coverage: {len(cuda_ops_in_sources())} CUDA ops, all covered")
        return 1 if missing else 0
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")

    global DEV
    DEV = args.device
    import torch
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no GPU: torch sees no CUDA device, nothing to run", flush=True)
        return 0
    import fastar
    from fastar import _backend
    print(f"device {torch.cuda.get_device_name(0) if DEV == 'cuda' else 'cpu'}, torch {torch.__version__}, fastar from "
          f"{os.path.dirname(fastar.__file__)}, {DEV} kernels: {', '.join(sorted(_backend._KERNELS[DEV])) or 'none'}",
          flush=True)
    failed = len(missing)
    for name in args.cases or list(CASES):
        fn, _ = CASES[name]
        print(f"START {name}", flush=True)
        t0 = time.time()
        try:
            fn()
            _sync()  # an asynchronous launch error belongs to this case, not the next
            print(f"PASS {name} ({time.time() - t0:.1f} s)", flush=True)
        except Exception as e:
            failed += 1
            msg = " ".join(f"{type(e).__name__}: {e}".split())
            print(f"FAIL {name}: {msg[:500]}", flush=True)
            traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
    print(f"{len(args.cases or CASES) + (1 if missing else 0) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
