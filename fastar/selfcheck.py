"""``fastar check`` / :func:`fastar.check`: prove this build on this machine's own devices.

Three kinds of rows, for the CPU and for every CUDA device present:

- **op**: every compiled op against its pure-PyTorch ``_ref`` twin, on small random inputs and on
  special values (saturating magnitudes, a NaN, an infinity), in every dtype the op's kernel takes
  on that device (float32, float64, and float16/bfloat16 where it takes them). The op runs once under
  ``fastar.backend("kernel")`` and once under ``fastar.backend("reference")`` on copies of the same
  inputs; outputs and, for the differentiable ops, gradients are compared: the NaN/inf pattern
  exactly, integer outputs (draws) exactly, the rest within the per-dtype tolerance
  (``atol + rtol * |ref|`` elementwise, 10x on special values; the table shows the element nearest
  its tolerance: its error and its tolerance).
  The fused sampling steps (``wavenet_step``, ``gated_pixelcnn_step``, ...) are checked through their
  family's tiny model: a cached sample with the kernel against one with the reference, same seed.
- **model**: one tiny model of every registered family (:data:`fastar.models.SPECS`, so a family
  registered later is covered without a change here) samples in float64 from one seed with the
  naive sampler, the default cached sampler and the per-op cache: all three must be identical.
- **graph** (CUDA only): one decode step captured in a CUDA graph and replayed, for every family whose
  cache is capturable: the same values as eager steps.

:func:`check` returns a :class:`CheckReport` (``.ok``, ``.rows``, ``.table()``); ``fastar check``
prints the table and exits 1 on any failure, saying what to report. A CUDA op that fails its check
is recorded (:mod:`fastar._backend`, kept per build and GPU under ``$FASTAR_CACHE_DIR`` or
``~/.cache/fastar``): from then on that op raises, naming the failure, unless the user sets
``FASTAR_CUDA_FALLBACK=ref``, which runs its reference instead (with a warning): never silently.
"""
from __future__ import annotations

import copy
import math
import time
import zlib
from dataclasses import dataclass, field

import torch

from fastar import _backend

__all__ = ["check", "CheckReport", "CheckRow", "OP_CASES", "REPORT_HINT"]

REPORT_HINT = ("Please report it at the fastar issue tracker with this table, the output of `fastar info --json` "
               "and `nvidia-smi` (GPU runs). Until it is fixed: fastar.set_backend('reference') runs every op on "
               "its pure-PyTorch twin; on CUDA, FASTAR_CUDA_FALLBACK=ref does so for the failed ops only.")

# Tolerances of kernel vs twin, by dtype (the test suite's table): |a - b| <= atol + rtol * |b|.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
# Saturating inputs (logits of 40, log-scales of 30) put float32 gradients through cancellations that
# kernel and twin round differently: those rows get 10x the tolerance (the test suite's gradient checks too).
SPECIAL_TOL_SCALE = 10.0
_SHORT = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass
class CheckRow:
    kind: str            # "op", "model" or "graph"
    name: str            # the op, or the family
    device: str
    dtype: str
    inputs: str          # "random", "special", a tiny config, ...
    err: float           # the largest error (0 for exact comparisons that agree)
    tol: float           # the tolerance at that element (0: exact)
    ok: bool
    note: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class CheckReport:
    rows: list = field(default_factory=list)
    uncovered: list = field(default_factory=list)     # compiled ops with no check case
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    @property
    def failures(self) -> list:
        return [r for r in self.rows if not r.ok]

    def table(self) -> str:
        head = ("kind", "name", "device", "dtype", "inputs", "max error", "tolerance", "result")
        lines = [head]
        for r in self.rows:
            lines.append((r.kind, r.name, r.device, r.dtype, r.inputs, f"{r.err:.3g}", f"{r.tol:.3g}",
                          ("pass" if r.ok else "FAIL") + (f" ({r.note})" if r.note else "")))
        w = [max(len(line[k]) for line in lines) for k in range(len(head))]
        out = ["  ".join(c.ljust(w[k]) for k, c in enumerate(line)).rstrip() for line in lines]
        out.insert(1, "  ".join("-" * x for x in w))
        return "\n".join(out)

    def as_dict(self) -> dict:
        return dict(ok=self.ok, seconds=self.seconds, uncovered=list(self.uncovered),
                    rows=[r.as_dict() for r in self.rows])


# ------------------------------------------------------------------------------------ comparison

def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    res = []
    for o in out:
        if o is not None:
            res.extend(_flat(o))
    return res


def _compare_one(a, b, rtol, atol):
    """(error, tolerance, ratio, note) of one output against one reference output; ratio > 1: fail."""
    if a.shape != b.shape:
        return math.inf, 0.0, math.inf, f"shape {list(a.shape)} vs {list(b.shape)}"
    if a.numel() == 0:
        return 0.0, 0.0, 0.0, ""
    if not a.is_floating_point() or not b.is_floating_point():
        bad = int((a != b).sum())
        return (float(bad), 0.0, math.inf, f"{bad} of {a.numel()} draws differ") if bad else (0.0, 0.0, 0.0, "")
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    for name, pred in (("NaN", torch.isnan), ("+inf", lambda t: t == math.inf), ("-inf", lambda t: t == -math.inf)):
        if not torch.equal(pred(a64), pred(b64)):
            n = int((pred(a64) != pred(b64)).sum())
            return math.inf, 0.0, math.inf, f"{name} pattern differs at {n} elements"
    fin = torch.isfinite(a64) & torch.isfinite(b64)
    if not fin.any():
        return 0.0, 0.0, 0.0, ""
    diff = (a64 - b64).abs()[fin]
    tol = atol + rtol * b64.abs()[fin]
    ratio = diff / tol
    i = int(ratio.argmax())
    note = f"off by {float(diff[i]):.3g}" if float(ratio[i]) > 1 else ""
    return float(diff[i]), float(tol[i]), float(ratio[i]), note


def _compare(got, want, dtype, scale=1.0, want64=None):
    """(largest error, the tolerance at that element, ok, note) of the kernel's outputs against the
    twin's; the element reported is the one nearest its tolerance. A floating output of a
    low-precision run may instead be within tolerance of the twin run in float64 on the same inputs
    (where the float32 twin rounds worse than the kernel, e.g. a gradient through a saturated logistic)."""
    rtol, atol = TOLERANCES.get(dtype, (1e-4, 1e-4))
    rtol, atol = rtol * scale, atol * scale
    if len(got) != len(want) or (want64 is not None and len(want64) != len(want)):
        return math.inf, 0.0, False, f"{len(got)} outputs vs {len(want)}"
    worst = (0.0, 0.0, -1.0, "")
    for k, (a, b) in enumerate(zip(got, want)):
        r = _compare_one(a, b, rtol, atol)
        if r[2] > 1 and want64 is not None and a.is_floating_point():
            r64 = _compare_one(a, want64[k].to(a.dtype) if not a.is_floating_point() else want64[k], rtol, atol)
            if r64[2] < r[2]:
                r = r64
        if r[2] > worst[2]:
            worst = (r[0], r[1], r[2], f"output {k}: {r[3]}" if r[3] else "")
    err, tol, ratio, note = worst
    return err, tol, ratio <= 1, note


def _upcast(obj):
    """A copy of a case's arguments with every floating tensor (and module) in float64."""
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj.clone()
    if isinstance(obj, torch.nn.Module):
        return copy.deepcopy(obj).double()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_upcast(o) for o in obj)
    return copy.deepcopy(obj)


def _reference64(fn, args):
    with _backend.backend("reference"):
        return _flat(fn(*_upcast(args)))


def _run_both(fn, args):
    """fn(*args) under the kernel and under the reference, each on its own copy of args."""
    res = {}
    for mode in ("kernel", "reference"):
        a = copy.deepcopy(args)
        with _backend.backend(mode):
            res[mode] = _flat(fn(*a))
    return res["kernel"], res["reference"]


# ------------------------------------------------------------------------------------- op cases
# Each case: case(device, dtype, special, g) -> (fn, args); fn(*args) returns the tensors to compare
# (outputs, updated in-place buffers, gradients). special=True puts NaN / inf / saturating values in.

def _randn(g, *shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)


def _poke(t, special, values=(float("nan"), 40.0, -40.0, float("inf"))):
    """Special values into the first few elements of t (in place on a copy)."""
    if not special:
        return t
    t = t.clone()
    flat = t.view(-1)
    for k, v in enumerate(values[:flat.numel()]):
        flat[(k * 7919) % flat.numel()] = v
    return t


def _with_grads(outs, inputs, g_seed):
    """The outputs and the gradient of a fixed random weighting of them w.r.t. inputs."""
    outs = _flat(outs)
    gen = torch.Generator().manual_seed(g_seed)
    total = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)).sum()
                for o in outs if o.is_floating_point())
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    return [o.detach() for o in outs] + [gr for gr in grads if gr is not None]


def _causal_mask(c_out, c_in, k, kind):
    m = torch.ones(c_out, c_in, k, k)
    m[:, :, k // 2, k // 2 + (kind == "B"):] = 0
    m[:, :, k // 2 + 1:] = 0
    return m


def _case_masked_conv2d(device, dtype, special, g):
    from fastar.ops import masked_conv2d

    x = _poke(_randn(g, 2, 3, 6, 7, dtype=dtype, device=device), special)
    w = _randn(g, 4, 3, 3, 3, dtype=dtype, device=device, scale=0.3)
    b = _randn(g, 4, dtype=dtype, device=device)
    mask = _causal_mask(4, 3, 3, "B").to(device, dtype)

    def fn(x, w, b, mask):
        x, w, b = (t.requires_grad_() for t in (x, w, b))
        return _with_grads(masked_conv2d(x, w, b, mask), (x, w, b), 1)
    return fn, (x, w, b, mask)


def _case_masked_conv2d_at(device, dtype, special, g):
    from fastar.ops import masked_conv2d_at

    x = _poke(_randn(g, 2, 3, 5, 5, dtype=dtype, device=device), special)
    new = _randn(g, 2, 3, 2, dtype=dtype, device=device)
    w = _randn(g, 4, 3, 3, 3, dtype=dtype, device=device, scale=0.3)
    b = _randn(g, 4, dtype=dtype, device=device)
    mask = _causal_mask(4, 3, 3, "A").to(device, dtype)
    pos = torch.tensor([[1, 2], [3, 4]], device=device)

    def fn(x, new, w, b, mask, pos):
        y = masked_conv2d_at(x, new, w, b, mask, pos)
        return [y, x]                               # the output and the cache it wrote into
    return fn, (x, new, w, b, mask, pos)


def _case_categorical(device, dtype, special, g):
    from fastar.ops import categorical_sample

    logits = _poke(_randn(g, 6, 9, dtype=dtype, device=device, scale=2.0), special,
                   (40.0, -40.0, float("-inf")))
    noise = torch.rand(6, generator=g, dtype=torch.float64).to(device, dtype)

    def fn(logits, noise):
        return [categorical_sample(logits, 1, noise=noise), categorical_sample(logits, 1, noise=noise, temperature=0.5),
                categorical_sample(logits, 1, noise=noise, top_k=3)]
    return fn, (logits, noise)


def _case_dml_nll(device, dtype, special, g):
    from fastar.ops import discretized_mix_logistic_nll

    x = (torch.randint(0, 256, (2, 3, 3, 3), generator=g).double() / 255 * 2 - 1).to(device, dtype)
    p = _poke(_randn(g, 2, 20, 3, 3, dtype=dtype, device=device), special, (30.0, -30.0, 12.0))

    def fn(x, p):
        p.requires_grad_()
        return _with_grads([discretized_mix_logistic_nll(x, p, 2, reduction="none")], (p,), 2)
    return fn, (x, p)


def _case_dml_sample(device, dtype, special, g):
    from fastar.ops import sample_discretized_mix_logistic

    p = _poke(_randn(g, 2, 20, 3, 3, dtype=dtype, device=device), special, (30.0, -30.0, 12.0))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    noise = torch.rand(2, 4, 3, 3, generator=g, dtype=torch.float64).to(device, acc)

    def fn(p, noise):
        return [sample_discretized_mix_logistic(p, 2, noise=noise)]
    return fn, (p, noise)


def _case_dml_value(device, dtype, special, g):
    """Colour 2 given colours 0 and 1 (the codec's step), as probabilities (a far tail may be -inf in
    one and a tiny log in the other)."""
    from fastar.ops import dml_value_log_probs

    p = _poke(_randn(g, 5, 20, dtype=dtype, device=device), special, (30.0, -30.0, 12.0))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    prev = ((torch.randint(0, 256, (5, 2), generator=g).double() * 2 - 255) / 255).to(device, acc)

    def fn(p, prev):
        return [dml_value_log_probs(p, prev, 2, 2, 8).exp()]
    return fn, (p, prev)


def _case_causal_conv1d_update(device, dtype, special, g):
    from fastar.ops import causal_conv1d_update

    x = _poke(_randn(g, 2, 3, dtype=dtype, device=device), special, (40.0, float("nan")))
    state = _randn(g, 2, 3, 4, dtype=dtype, device=device)
    w = _randn(g, 5, 3, 3, dtype=dtype, device=device, scale=0.5)
    b = _randn(g, 5, dtype=dtype, device=device)

    def fn(x, state, w, b):
        return [causal_conv1d_update(x, state, w, b, 2, 5), state]
    return fn, (x, state, w, b)


def _case_skew(device, dtype, special, g):
    from fastar.ops import skew, unskew

    x = _poke(_randn(g, 2, 3, 4, 5, dtype=dtype, device=device), special)

    def fn(x):
        x.requires_grad_()
        y = skew(x)
        return _with_grads([y, unskew(y)], (x,), 3)
    return fn, (x,)


def _case_diagonal(device, dtype, special, g):
    from fastar.ops import diagonal_lstm_scan

    hid = 3
    is_map = _poke(_randn(g, 2, 4 * hid, 4, 5, dtype=dtype, device=device), special,
                   (40.0, -40.0, 1e4, -1e4))
    w = _randn(g, 4 * hid, hid, 2, dtype=dtype, device=device, scale=0.5)
    b = _randn(g, 4 * hid, dtype=dtype, device=device)
    h0 = _randn(g, 2, hid, 4, dtype=dtype, device=device)
    c0 = _randn(g, 2, hid, 4, dtype=dtype, device=device)

    def fn(is_map, w, b, h0, c0):
        ins = tuple(t.requires_grad_() for t in (is_map, w, b, h0, c0))
        return _with_grads(diagonal_lstm_scan(*ins), ins, 4)
    return fn, (is_map, w, b, h0, c0)


def _case_row(device, dtype, special, g):
    from fastar.ops import row_lstm_scan

    hid = 3
    is_map = _poke(_randn(g, 2, 4 * hid, 4, 5, dtype=dtype, device=device), special,
                   (40.0, -40.0, 1e4, -1e4))
    w = _randn(g, 4 * hid, hid, 3, dtype=dtype, device=device, scale=0.5)
    b = _randn(g, 4 * hid, dtype=dtype, device=device)

    def fn(is_map, w, b):
        ins = tuple(t.requires_grad_() for t in (is_map, w, b))
        return _with_grads(row_lstm_scan(*ins), ins, 5)
    return fn, (is_map, w, b)


def _model_case(family, config_filter=None):
    """A fused step checked through its family's tiny model: a cached float draw with the kernel
    against one with the reference (values exactly, recorded per-step parameters within tolerance)."""

    def case(device, dtype, special, g):
        from fastar import sampling
        from fastar.models import SPECS

        spec = SPECS[family]
        tiny = next((t for t in spec.tiny if config_filter is None or config_filter(t["config"])), spec.tiny[0])
        torch.manual_seed(0)
        model = spec.cls(**tiny["config"]).to(device, dtype).eval()
        if special:                              # saturate: every weight scaled up
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(8.0)
        cond = tiny.get("cond")
        if isinstance(cond, int):
            cond = torch.full((2,), cond, dtype=torch.int64, device=device)
        seed = int(torch.randint(0, 2 ** 31, (1,), generator=g))

        def fn(model):
            x, params = sampling.sample(model, 2, tiny["shape"], cond, torch.Generator().manual_seed(seed),
                                        progress=False, return_params=True, cuda_graphs=False)
            return [x, params]
        return fn, (model,)
    return case


def _case_pixelrnn_step(device, dtype, special, g):
    """Both layer kinds of a tiny PixelRNN (RGB, 4 levels), drawn with the kernel and the twin."""
    from fastar import sampling
    from fastar.models import PixelRNN

    models = []
    for kind in ("diagonal", "row"):
        torch.manual_seed(0)
        m = PixelRNN(kind, in_channels=3, levels=4, layers=2, hidden=6).to(device, dtype).eval()
        if special:
            with torch.no_grad():
                for p in m.parameters():
                    p.mul_(8.0)
        models.append(m)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=g))

    def fn(*models):
        out = []
        for m in models:
            out += list(sampling.sample(m, 2, (3, 4), None, torch.Generator().manual_seed(seed), progress=False,
                                        return_params=True, cuda_graphs=False, fused=True))
        return out
    return fn, tuple(models)


def _case_pixelcnnpp_step(device, dtype, special, g):
    """A tiny class-conditional PixelCNN++ (RGB, 8-bit, every resolution in use), drawn with the kernel
    and the twin (the fused pixel step runs the whole ul program and the output layer)."""
    from fastar import sampling
    from fastar.models import PixelCNNpp

    torch.manual_seed(0)
    m = PixelCNNpp(3, nr_resnet=1, nr_filters=4, nr_logistic_mix=2, dropout=0.0, num_classes=2).to(device, dtype)
    m.eval()
    if special:
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(4.0)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=g))
    cond = torch.tensor([0, 1], device=device)

    def fn(model):
        return list(sampling.sample(model, 2, (5, 4), cond, torch.Generator().manual_seed(seed), progress=False,
                                    return_params=True, cuda_graphs=False, fused=True))
    return fn, (m,)


def _case_made_step(device, dtype, special, g):
    """A tiny MADE (two hidden layers, direct connections, two masks sharing one ordering, 3 levels), drawn
    in one fused call with the kernel and the twin."""
    from fastar import sampling
    from fastar.models import MADE

    torch.manual_seed(0)
    m = MADE(6, [9, 8], levels=3, num_masks=2, natural_ordering=True, connectivity="agnostic", direct=True,
             seed=1).to(device, dtype)
    m.eval()
    if special:
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(6.0)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=g))

    def fn(model):
        return list(sampling.sample(model, 3, (6,), None, torch.Generator().manual_seed(seed), progress=False,
                                    return_params=True, cuda_graphs=False, fused=True))
    return fn, (m,)


def _op_dtypes(module_attr):
    def get(device_type):
        mod, attr = module_attr
        import importlib

        return tuple(getattr(importlib.import_module(mod), attr).get(device_type, ()))
    return get


# op name -> (case, dtypes(device_type), the ops it covers besides itself)
OP_CASES = {
    "masked_conv2d": (_case_masked_conv2d, _op_dtypes(("fastar.ops.masked_conv", "KERNEL_DTYPES")),
                      ("masked_conv2d_backward",)),
    "masked_conv2d_at": (_case_masked_conv2d_at, _op_dtypes(("fastar.ops.masked_conv_at", "KERNEL_DTYPES")), ()),
    "categorical_sample": (_case_categorical, _op_dtypes(("fastar.ops.mixture", "CATEGORICAL_KERNEL_DTYPES")), ()),
    "discretized_mix_logistic_nll": (_case_dml_nll, _op_dtypes(("fastar.ops.mixture", "DML_KERNEL_DTYPES")),
                                     ("discretized_mix_logistic_nll_backward",)),
    "sample_discretized_mix_logistic": (_case_dml_sample, _op_dtypes(("fastar.ops.mixture", "DML_KERNEL_DTYPES")),
                                        ()),
    "dml_value_log_probs": (_case_dml_value, _op_dtypes(("fastar.ops.mixture", "VALUE_KERNEL_DTYPES")), ()),
    "causal_conv1d_update": (_case_causal_conv1d_update, _op_dtypes(("fastar.ops.wavenet", "KERNEL_DTYPES")), ()),
    "skew": (_case_skew, _op_dtypes(("fastar.ops.lstm_scan", "SKEW_DTYPES")), ("unskew",)),
    "diagonal_lstm_scan": (_case_diagonal, _op_dtypes(("fastar.ops.lstm_scan", "KERNEL_DTYPES")),
                           ("diagonal_lstm_scan_backward",)),
    "row_lstm_scan": (_case_row, _op_dtypes(("fastar.ops.lstm_scan", "KERNEL_DTYPES")), ("row_lstm_scan_backward",)),
    "wavenet_step": (_model_case("wavenet"), lambda d: tuple(t for t in _op_dtypes(
        ("fastar.ops.wavenet", "STEP_KERNEL_DTYPES"))(d) if t in (torch.float32, torch.float64)), ()),
    "gated_pixelcnn_step": (_model_case("gated_pixelcnn"),
                            _op_dtypes(("fastar.ops.gated_pixelcnn", "KERNEL_DTYPES")), ()),
    "pixelrnn_step": (_case_pixelrnn_step, _op_dtypes(("fastar.ops.pixelrnn", "KERNEL_DTYPES")), ()),
    "made_sample_steps": (_case_made_step, _op_dtypes(("fastar.ops.made", "KERNEL_DTYPES")), ()),
    "pixelcnnpp_ul_step": (_case_pixelcnnpp_step, _op_dtypes(("fastar.ops.pixelcnnpp", "KERNEL_DTYPES")), ()),
}


def add_op_case(op, case, dtypes, covers=()):
    """Register the check of a new compiled op (a family's ops module calls this at import):
    ``case(device, dtype, special, generator) -> (fn, args)``; ``dtypes(device_type)`` the dtypes
    its kernel takes there; ``covers`` the ops the same rows also exercise (its backward)."""
    OP_CASES[op] = (case, dtypes, tuple(covers))


def _uncovered():
    covered = set(OP_CASES)
    for _, _, also in OP_CASES.values():
        covered.update(also)
    return [op for op in _backend.OPS if op not in covered and not op.startswith("_")]


# ------------------------------------------------------------------------------------ the runs

def _op_rows(device, ops):
    rows = []
    kernels = _backend.CPU_KERNELS if device.type == "cpu" else _backend.CUDA_KERNELS
    for op in ops:
        case, dtypes, _ = OP_CASES[op]
        if op not in kernels:
            rows.append(CheckRow("op", op, str(device), "-", "-", 0.0, 0.0, True,
                                 f"no {device.type.upper()} kernel built: runs on its reference"))
            continue
        for dtype in dtypes(device.type):
            for special in (False, True):
                t0 = time.perf_counter()
                g = torch.Generator().manual_seed(zlib.crc32(f"{op} {dtype} {special}".encode()))
                try:
                    fn, args = case(device, dtype, special, g)
                    got, want = _run_both(fn, args)
                    want64 = _reference64(fn, args) if dtype != torch.float64 else None
                    err, tol, ok, note = _compare(got, want, dtype, SPECIAL_TOL_SCALE if special else 1.0, want64)
                except Exception as e:  # noqa: BLE001 - a crashing kernel is a failed row, not a crashed check
                    err, tol, ok, note = math.inf, 0.0, False, f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
                rows.append(CheckRow("op", op, str(device), _SHORT.get(dtype, str(dtype)),
                                     "special" if special else "random", err, tol, ok, note,
                                     time.perf_counter() - t0))
    return rows


def _model_rows(device, families):
    from fastar import sampling
    from fastar.models import SPECS

    rows = []
    for name in families:
        spec = SPECS[name]
        t0 = time.perf_counter()
        note, ok = "", True
        try:
            tiny = spec.tiny[0]
            torch.manual_seed(0)
            model = spec.cls(**tiny["config"]).to(device, torch.float64).eval()
            cond = tiny.get("cond")
            if isinstance(cond, int):
                cond = torch.full((2,), cond, dtype=torch.int64, device=device)

            def run():
                return sampling.prepare(model, 2, tiny["shape"], cond, torch.Generator().manual_seed(11))
            naive = sampling.naive_sample(model, run())
            cached = sampling.cached_sample(model, run(), cuda_graphs=False)
            per_op = sampling.cached_sample(model, run(), cuda_graphs=False, fused=False)
            bad = [what for what, x in (("cached", cached), ("per-op cached", per_op)) if not torch.equal(x, naive)]
            if bad:
                ok, note = False, " and ".join(bad) + " != naive"
        except Exception as e:  # noqa: BLE001
            ok, note = False, f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
        rows.append(CheckRow("model", name, str(device), "float64", "tiny, cached vs naive", 0.0 if ok else math.inf,
                             0.0, ok, note, time.perf_counter() - t0))
    return rows


def _graph_rows(device, families):
    """CUDA: one decode step captured in a CUDA graph and replayed, for each family whose cache can be."""
    from fastar import sampling
    from fastar.models import SPECS

    rows = []
    for name in families:
        spec = SPECS[name]
        tiny = spec.tiny[0]
        t0 = time.perf_counter()
        try:
            torch.manual_seed(0)
            model = spec.cls(**tiny["config"]).to(device, torch.float32).eval()
            cond = tiny.get("cond")
            if isinstance(cond, int):
                cond = torch.full((2,), cond, dtype=torch.int64, device=device)
            run = sampling.prepare(model, 2, tiny["shape"], cond, torch.Generator().manual_seed(5))
            from fastar.sampling.engine import _allocate

            if not getattr(_allocate(model, run, None), "capturable", False):
                continue
            eager = sampling.cached_sample(model, sampling.prepare(
                model, 2, tiny["shape"], cond, torch.Generator().manual_seed(5)), cuda_graphs=False)
            graphed = sampling.cached_sample(model, sampling.prepare(
                model, 2, tiny["shape"], cond, torch.Generator().manual_seed(5)), cuda_graphs=True)
            torch.cuda.synchronize(device)
            ok = torch.equal(eager, graphed)
            note = "" if ok else "replayed graph != eager steps"
        except Exception as e:  # noqa: BLE001
            ok, note = False, f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
        rows.append(CheckRow("graph", name, str(device), "float32", "capture + replay", 0.0 if ok else math.inf, 0.0,
                             ok, note, time.perf_counter() - t0))
    return rows


def _devices(device):
    if device is None or device == "all":
        devs = [torch.device("cpu")]
        if torch.cuda.is_available():
            devs += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        return devs
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise ValueError(f"fastar check: device must be 'cpu', 'cuda', 'cuda:N' or 'all', got {device!r}")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("fastar check: device 'cuda' asked for, but torch sees no CUDA GPU")
    return [d]


def check(device: str | None = None, ops=None, families=None, record: bool = True) -> CheckReport:
    """Run the self-check on ``device`` ("cpu", "cuda", "cuda:N"; None or "all": the CPU and every GPU).

    ``ops`` / ``families`` narrow it to some ops / registered families (default: all). Returns a
    :class:`CheckReport`; nothing is printed. With ``record`` (default) the CUDA ops that failed are
    recorded for this build and GPU, so that they raise (or, under ``FASTAR_CUDA_FALLBACK=ref``, run
    their reference) from then on; a passing run clears the record.
    """
    from fastar.models import SPECS

    t0 = time.perf_counter()
    if ops is None:
        ops = [op for op in OP_CASES if _backend.C_LOADED]
    unknown = [op for op in ops if op not in OP_CASES]
    if unknown:
        raise ValueError(f"fastar check: no check for op(s) {unknown}; known: {sorted(OP_CASES)}")
    if families is None:
        families = list(SPECS)
    unknown = [f for f in families if f not in SPECS]
    if unknown:
        raise ValueError(f"fastar check: unknown family(ies) {unknown}; registered: {sorted(SPECS)}")
    report = CheckReport(uncovered=_uncovered())
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)                     # tiny problems: one thread is the fastest and the quietest
    try:
        for dev in _devices(device):
            with _backend.checking():            # a recorded failure must not stop the check itself
                rows = _op_rows(dev, ops) + _model_rows(dev, families)
                if dev.type == "cuda":
                    rows += _graph_rows(dev, families)
            report.rows += rows
            if dev.type == "cuda" and record:
                failed = sorted({r.name for r in rows if r.kind == "op" and not r.ok})
                _backend.record_cuda_failures(dev, failed)
    finally:
        torch.set_num_threads(prev_threads)
    report.seconds = time.perf_counter() - t0
    return report
