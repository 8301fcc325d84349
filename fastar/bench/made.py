"""MADE and NADE: training with masks applied per step vs folded, and sampling in one pass vs D passes.

Training rows: a 2 x 500 MADE on 28x28 binary images (D = 784), batch 100, float32, forward + backward
(``model.loss(x).backward()``), images/s: "masked per step" is MADE as it is (every MaskedLinear
multiplies weight by its mask in every forward, and autograd multiplies the gradient by it again);
"folded" keeps weight * mask as the parameter itself (folded once per mask change) and masks only the
gradient (a hook), the plain-PyTorch best a fixed mask allows. The two are timed interleaved.

Sampling rows: the same MADE (untrained weights, one mask), n = 100 and 1,000 images: naive = D full
forward passes (``method="naive"``, extrapolated as D x the median forward time when the full run
would pass ``NAIVE_BUDGET_S``) vs cached = the one-pass degree-bucket sampler
(:func:`fastar.ops.made_sample_steps`, its kernel on this device) beside the floor: the multiply-adds of
one masked forward pass (every weight, as a dense GEMM does them) at the best GEMM rate measured here
(torch.mm 512 x 512, the fastest of its interleaved calls, on all threads and on one: the engine runs the op on one thread, its thread policy
switching only ops proven thread-count neutral), and the measured time of one forward pass itself; the
cached sampler, the forward pass and the GEMMs are timed interleaved (round-robin), so load drift on the
shared machine reaches them alike.

NADE rows: NADE(784, 500), n = 100 and 1,000: cached sampling (the running-sum cache through the engine,
D steps) vs one forward pass (``model.nll``) on the same batch.
"""
from __future__ import annotations

import statistics

import torch

from fastar.bench.timing import sync, time_fn, time_interleaved, timed
from fastar.models import MADE, NADE

FAMILY = "made"
DEVICES = ("cpu", "cuda")

COLUMNS = ["case", "what", "a_ms", "b_ms", "ratio", "floor_ms", "forward_ms", "images_per_s", "note"]

NOTES = ("Training: a_ms = masked per step, b_ms = folded, per forward+backward of batch 100 (images_per_s of "
         "each in the note), ratio = a/b. Sampling: a_ms = naive (D forward passes), b_ms = cached (one-pass "
         "degree buckets), ratio = naive / cached; floor_ms = the flops of one dense masked forward pass at the "
         "best measured 512x512 GEMM rate; forward_ms = one forward pass measured. NADE: a_ms = one forward (nll), "
         "b_ms = cached sampling, ratio = sampling / forward. Untrained weights. The CPU is shared: figures move "
         "by tens of percent between runs.")

NAIVE_BUDGET_S = 60.0
D, HID = 784, 500


def _made(dev, dtype=torch.float32):
    torch.manual_seed(0)
    return MADE(D, [HID, HID], natural_ordering=False, shape=(1, 28, 28)).to(dev, dtype)


def _training_rows(dev, quick):
    model = _made(dev).train()
    x = torch.randint(0, 2, (100, 1, 28, 28), device=dev)

    folded = _made(dev).train()
    masks = [l.mask.clone() for l in folded.layers] + [folded.out.mask.clone()]
    mods = list(folded.layers) + [folded.out]
    for m, mk in zip(mods, masks):
        with torch.no_grad():
            m.weight.mul_(mk)
        m.mask.fill_(1.0)                              # the forward is a plain linear layer now
        m.weight.register_hook(lambda g, mk=mk: g * mk)
    folded._use = lambda k: None                       # the masks stay folded: no re-application

    def step(mod):
        def fn():
            mod.zero_grad(set_to_none=True)
            mod.loss(x).backward()
        return fn

    t = time_interleaved({"masked": step(model), "folded": step(folded)}, dev, warmup=2, repeat=5 if quick else 15)
    a, b = t["masked"]["median_ms"], t["folded"]["median_ms"]
    row = dict(case="MADE 2x500 D=784 b100 train", what="fwd+bwd", a_ms=a, b_ms=b, ratio=a / b,
               images_per_s=100 / (b * 1e-3),
               note=f"masked per step {100 / (a * 1e-3):.0f} img/s, folded {100 / (b * 1e-3):.0f} img/s")
    print(f"  training: masked per step {a:.1f} ms, folded {b:.1f} ms, ratio {a / b:.2f}", flush=True)
    return [row]


def _on_threads(n, fn):
    def call():
        prev = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(prev)
    return call


def _sampling_rows(dev, quick):
    model = _made(dev).eval()
    threads = torch.get_num_threads()
    a = torch.randn(512, 512, device=dev)
    rows = []
    for n in ((100,) if quick else (100, 1000)):
        flops = 2 * n * (D * HID + HID * HID + HID * D)
        x = torch.zeros(n, 1, 28, 28, dtype=torch.int64, device=dev)

        def cached():
            return model.sample(n, None, generator=torch.Generator().manual_seed(0), progress=False)

        fns = {"cached": cached, "forward": lambda: model(x), "gemm": lambda: torch.mm(a, a)}
        if dev.type == "cpu":
            fns["gemm1"] = _on_threads(1, lambda: torch.mm(a, a))
        with torch.no_grad():
            t = time_interleaved(fns, dev, warmup=1, repeat=3 if quick else 9)
        cs, fwd_ms = t["cached"]["median_ms"], t["forward"]["median_ms"]
        # The floor at the best GEMM rate seen (the fastest of the interleaved calls): what the machine can do.
        floor_ms = flops / (2 * 512 ** 3 / (t["gemm"]["min_ms"] * 1e-3)) * 1e3
        floor1 = flops / (2 * 512 ** 3 / (t["gemm1"]["min_ms"] * 1e-3)) * 1e3 if "gemm1" in t and threads > 1 else None
        out_c = cached()
        est = D * fwd_ms
        if quick or est > NAIVE_BUDGET_S * 1e3:
            ns, how, same = est, "extrapolated: D x forward", None
        else:
            s, out_n = timed(lambda: model.sample(n, None, generator=torch.Generator().manual_seed(0),
                                                   method="naive", progress=False), dev)
            ns, how, same = s * 1e3, "full run", bool(torch.equal(out_n, out_c))
        note = (f"naive {how}" + ("" if same is None else f"; same images: {same}")
                + f"; cached / floor = {cs / floor_ms:.2f}"
                + ("" if floor1 is None else f" ({threads} threads), {cs / floor1:.2f} (1 thread: floor {floor1:.1f} ms;"
                   " the engine runs the op on one thread)")
                + f"; cached / forward = {cs / fwd_ms:.2f}")
        rows.append(dict(case=f"MADE 2x500 D=784 sample n={n}", what="sample", a_ms=ns, b_ms=cs, ratio=ns / cs,
                         floor_ms=floor_ms, forward_ms=fwd_ms, images_per_s=n / (cs * 1e-3), note=note))
        print(f"  sample n={n}: naive {ns:.0f} ms ({how}), cached {cs:.1f} ms, x{ns / cs:.0f}; floor {floor_ms:.1f} "
              f"ms" + ("" if floor1 is None else f" (1 thread {floor1:.1f} ms)") + f", forward {fwd_ms:.1f} ms"
              + ("" if same is None else f", same images {same}"), flush=True)
    return rows


def _nade_rows(dev, quick):
    torch.manual_seed(0)
    model = NADE(D, HID, shape=(1, 28, 28)).to(dev).eval()
    rows = []
    for n in ((100,) if quick else (100, 1000)):
        x = torch.randint(0, 2, (n, 1, 28, 28), device=dev)
        with torch.no_grad():
            fwd = time_fn(lambda: model.nll(x), dev, warmup=1, repeat=3 if quick else 7)["median_ms"]
        ts = [timed(lambda: model.sample(n, None, generator=torch.Generator().manual_seed(0), progress=False),
                     dev)[0] * 1e3 for _ in range(2 if quick else 5)]
        cs = statistics.median(ts)
        rows.append(dict(case=f"NADE 500 D=784 n={n}", what="sample vs forward", a_ms=fwd, b_ms=cs, ratio=cs / fwd,
                         forward_ms=fwd, images_per_s=n / (cs * 1e-3),
                         note="ratio = cached sampling / one forward pass"))
        print(f"  NADE n={n}: forward {fwd:.1f} ms, cached sampling {cs:.1f} ms, ratio {cs / fwd:.2f}", flush=True)
    return rows


def run(device: str, quick: bool = False) -> list[dict]:
    dev = torch.device(device)
    return _training_rows(dev, quick) + _sampling_rows(dev, quick) + _nade_rows(dev, quick)
