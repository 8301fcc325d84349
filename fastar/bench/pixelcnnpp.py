"""PixelCNN++: sampling (naive vs the multi-resolution cache) and training throughput (fastar's
network vs pclucas14/pixel-cnn-pp's forward written plainly in PyTorch on the same weights).

Sampling rows (also part of ``fastar bench sampling``): the paper's CIFAR-10 network (nr_resnet=5,
nr_filters=160, 10 logistic components) and a reduced one (nr_filters=40), 32x32 RGB, untrained
float32 weights, eval mode; batch 1 and 16 (and 256 on a GPU). naive = one full forward pass per
pixel (1,024 steps): extrapolated as 1,024 x the median of full passes when the full run would
exceed ``NAIVE_BUDGET_S``; cached = the engine with :class:`fastar.models.pixelcnnpp_cache.MultiResolutionCache`.

Breakdown rows: where the cached image's time goes (row work, position work, output layer and
draw), and the cached image beside one full forward pass, the floor of the work it spreads over the
steps.

Training rows: images/s of forward + backward + loss (batch 16 on CPU, 64 on a GPU, train mode,
channel dropout 0.5 in both) of :class:`fastar.models.PixelCNNpp` and of :class:`PortPixelCNN`, a
module-for-module PyTorch port of pclucas14's ``PixelCNN`` (``torch.nn.utils.parametrizations.weight_norm``
on ``nn.Conv2d`` / ``nn.ConvTranspose2d`` / ``nn.Linear``, its padding and crops), whose state_dict
``PixelCNNpp.from_pclucas14`` loads, so both run the same weights (checked: equal outputs in eval mode).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from fastar import sampling
from fastar.bench.timing import sampling_batches, sync, timed
from fastar.models import PixelCNNpp

FAMILY = "pixelcnnpp"

COLUMNS = ["case", "batch", "what", "fastar", "baseline", "ratio", "how", "same_images"]

NOTES = ("Sampling: time to sample one batch of 32x32 RGB images (seconds); baseline = naive (a full forward "
         "pass per pixel, 1,024 passes; 'extrapolated' = 1,024 x the median full pass when the whole run would "
         "exceed the budget), fastar = the multi-resolution cache (every activation computed once: u rows at "
         "row starts, ul positions per pixel, down-sampled streams every 2 or 4 steps); ratio = baseline / "
         "fastar. Training: images/s of forward + backward (train mode, channel dropout 0.5), fastar's "
         "PixelCNNpp vs pclucas14's PixelCNN as plain PyTorch modules on the same weights; ratio = fastar / "
         "baseline. Untrained float32 weights. The CPU is shared: figures move by tens of percent.")

NAIVE_BUDGET_S = 120.0
SIZE = 32

# (name, nr_resnet, nr_filters, nr_logistic_mix)
CASES = [
    ("reduced (nr_filters=40)", 5, 40, 10),
    ("paper (nr_filters=160)", 5, 160, 10),
]


# ---------------------------------------------------------------------------------------------
# pclucas14's PixelCNN as plain PyTorch modules (its key names, its weight norm, its crops).

class _Conv(nn.Module):
    def __init__(self, cin, cout, k, stride=1, right=False, shift=False):
        super().__init__()
        self.conv = weight_norm(nn.Conv2d(cin, cout, k, stride))
        kh, kw = k
        self.pad = (kw - 1, 0, kh - 1, 0) if right else ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0)
        self.right, self.shift = right, shift

    def forward(self, x):
        x = self.conv(F.pad(x, self.pad))
        if self.shift and self.right:
            return F.pad(x[..., :-1], (1, 0, 0, 0))
        if self.shift:
            return F.pad(x[:, :, :-1], (0, 0, 1, 0))
        return x


class _Deconv(nn.Module):
    def __init__(self, cin, cout, k, right=False):
        super().__init__()
        self.deconv = weight_norm(nn.ConvTranspose2d(cin, cout, k, 2, output_padding=1))
        self.k, self.right = k, right

    def forward(self, x):
        x = self.deconv(x)
        H, W = x.shape[2:]
        kh, kw = self.k
        if self.right:
            return x[:, :, :H - kh + 1, :W - kw + 1]
        return x[:, :, :H - kh + 1, (kw - 1) // 2:W - (kw - 1) // 2]


class _Nin(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.lin_a = weight_norm(nn.Linear(cin, cout))

    def forward(self, x):
        return self.lin_a(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _Resnet(nn.Module):
    def __init__(self, f, right, skip):
        super().__init__()
        k = (2, 2) if right else (2, 3)
        self.conv_input = _Conv(2 * f, f, k, right=right)
        if skip:
            self.nin_skip = _Nin(2 * skip * f, f)
        self.dropout = nn.Dropout2d(0.5)
        self.conv_out = _Conv(2 * f, 2 * f, k, right=right)

    def forward(self, x, a=None):
        ce = lambda t: F.elu(torch.cat([t, -t], 1))      # noqa: E731
        h = self.conv_input(ce(x))
        if a is not None:
            h = h + self.nin_skip(ce(a))
        h = self.conv_out(self.dropout(ce(h)))
        p, q = h.chunk(2, 1)
        return x + p * torch.sigmoid(q)


class _Layer(nn.Module):
    def __init__(self, n, f, u_skip, ul_skip):
        super().__init__()
        self.u_stream = nn.ModuleList([_Resnet(f, False, u_skip) for _ in range(n)])
        self.ul_stream = nn.ModuleList([_Resnet(f, True, ul_skip) for _ in range(n)])


class PortPixelCNN(nn.Module):
    """pclucas14/pixel-cnn-pp's ``PixelCNN(nr_resnet, nr_filters, nr_logistic_mix, input_channels)``,
    plainly: the baseline of the training rows (its state_dict loads with ``PixelCNNpp.from_pclucas14``)."""

    def __init__(self, nr_resnet=5, nr_filters=80, nr_logistic_mix=10, input_channels=3):
        super().__init__()
        f, c = nr_filters, input_channels
        self.nr = nr_resnet
        self.up_layers = nn.ModuleList([_Layer(nr_resnet, f, 0, 1) for _ in range(3)])
        self.down_layers = nn.ModuleList([_Layer(n, f, 1, 2) for n in (nr_resnet, nr_resnet + 1, nr_resnet + 1)])
        self.downsize_u_stream = nn.ModuleList([_Conv(f, f, (2, 3), 2) for _ in range(2)])
        self.downsize_ul_stream = nn.ModuleList([_Conv(f, f, (2, 2), 2, right=True) for _ in range(2)])
        self.upsize_u_stream = nn.ModuleList([_Deconv(f, f, (2, 3)) for _ in range(2)])
        self.upsize_ul_stream = nn.ModuleList([_Deconv(f, f, (2, 2), right=True) for _ in range(2)])
        self.u_init = _Conv(c + 1, f, (2, 3), shift=True)
        self.ul_init = nn.ModuleList([_Conv(c + 1, f, (1, 3), shift=True),
                                      _Conv(c + 1, f, (2, 1), right=True, shift=True)])
        self.nin_out = _Nin(f, (3 if c == 1 else 10) * nr_logistic_mix)

    def forward(self, x):
        x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        us, uls = [self.u_init(x)], [self.ul_init[0](x) + self.ul_init[1](x)]
        for i in range(3):
            for bu, bul in zip(self.up_layers[i].u_stream, self.up_layers[i].ul_stream):
                us.append(bu(us[-1]))
                uls.append(bul(uls[-1], us[-1]))
            if i != 2:
                us.append(self.downsize_u_stream[i](us[-1]))
                uls.append(self.downsize_ul_stream[i](uls[-1]))
        u, ul = us.pop(), uls.pop()
        for i in range(3):
            for bu, bul in zip(self.down_layers[i].u_stream, self.down_layers[i].ul_stream):
                u = bu(u, us.pop())
                ul = bul(ul, torch.cat([u, uls.pop()], 1))
            if i != 2:
                u, ul = self.upsize_u_stream[i](u), self.upsize_ul_stream[i](ul)
        return self.nin_out(F.elu(ul))


# ---------------------------------------------------------------------------------------------

def sampling_rows(device: str, quick: bool = False) -> list[dict]:
    """Naive vs cached sampling rows, in :mod:`fastar.bench.sampling`'s columns."""
    dev = torch.device(device)
    rows = []
    for name, nr, nf, k in CASES:
        if quick and nf > 40:
            continue
        torch.manual_seed(0)
        model = PixelCNNpp(3, nr, nf, k, dropout=0.0).to(dev).eval()
        for n in sampling_batches(dev):
            if quick and n > 1:
                continue

            def cached():
                run = sampling.prepare(model, n, (SIZE, SIZE), generator=torch.Generator(dev).manual_seed(1))
                return sampling.cached_sample(model, run)

            cached_s, x_cached = timed(cached, dev)            # one run: the first includes no warm-up to speak of
            if not quick and dev.type == "cuda":
                cached_s = min(cached_s, timed(cached, dev)[0])
            x0 = torch.zeros(n, 3, SIZE, SIZE, dtype=torch.int64, device=dev)
            passes = []
            with torch.no_grad():
                for r in range(1 + (1 if quick else 3)):
                    t = timed(lambda: model.params(x0), dev)[0]
                    if r:
                        passes.append(t)
            steps = SIZE * SIZE
            estimate = steps * statistics.median(passes)
            same = None
            if estimate <= NAIVE_BUDGET_S and not quick:
                run = sampling.prepare(model, n, (SIZE, SIZE), generator=torch.Generator(dev).manual_seed(1))
                naive_s, x_naive = timed(lambda: sampling.naive_sample(model, run), dev)
                how, same = "full run", bool(torch.equal(x_naive, x_cached))
            else:
                naive_s, how = estimate, "extrapolated"
            rows.append({"case": f"PixelCNN++ {name} 32x32x3", "batch": n, "steps": steps, "naive_s": naive_s,
                         "naive_how": how, "naive_backend": "reference", "cached_s": cached_s,
                         "speedup": naive_s / cached_s, "cached_ms_per_step": cached_s / steps * 1e3,
                         "unfused_s": None, "fused_gain": None, "same_images": same})
            print(f"  PixelCNN++ {name:<24} b{n:<4} naive {naive_s:9.2f} s ({how})  cached {cached_s:7.3f} s  "
                  f"x{naive_s / cached_s:.0f}", flush=True)
    return rows


def training_rows(device: str, quick: bool = False) -> list[dict]:
    dev = torch.device(device)
    rows = []
    batch = 64 if dev.type == "cuda" else 16
    for name, nr, nf, k in CASES:
        if quick and nf > 40:
            continue
        torch.manual_seed(0)
        port = PortPixelCNN(nr, nf, k).to(dev)
        ours = PixelCNNpp.from_pclucas14(port.state_dict()).to(dev)
        x = torch.randint(0, 256, (batch, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(0)).to(dev)
        xs = x.float() * (2 / 255) - 1
        port.eval()
        ours.eval()
        with torch.no_grad():
            diff = (port(xs) - ours.params(x)).abs().max().item()
        if diff > 1e-3:
            raise RuntimeError(f"PixelCNN++ bench: the port and fastar disagree on the same weights (max |diff| {diff})")
        port.train()
        ours.train()

        def step_ours():
            ours.zero_grad(set_to_none=True)
            ours.loss(x).backward()

        def step_port():
            port.zero_grad(set_to_none=True)
            out = port(xs)
            ours.dist.nll(xs, out, reduction="none").mean().backward()

        times = {"fastar": [], "port": []}
        for r in range(1 + (1 if quick else 3)):
            for key, fn in (("fastar", step_ours), ("port", step_port)):
                t = timed(fn, dev)[0]
                if r:
                    times[key].append(t)
        a, b = (batch / statistics.median(times[key]) for key in ("fastar", "port"))
        rows.append({"case": f"{name} 32x32x3", "batch": batch, "what": "training images/s", "fastar": a,
                     "baseline": b, "ratio": a / b, "how": "fwd+bwd, median of interleaved steps",
                     "same_images": None})
        print(f"  PixelCNN++ training {name:<24} b{batch}: fastar {a:8.1f} img/s  port {b:8.1f} img/s", flush=True)
    return rows


def breakdown_rows(device: str, quick: bool = False) -> list[dict]:
    """Where a cached image's time goes (the reduced net): the row work (u streams), the position work
    (ul streams), the output layer and the draw, beside the floor: one full forward pass, the same
    arithmetic the cache spreads over the steps (every activation computed once)."""
    dev = torch.device(device)
    rows = []
    name, nr, nf, k = CASES[0]
    torch.manual_seed(0)
    model = PixelCNNpp(3, nr, nf, k, dropout=0.0).to(dev).eval()
    for n in sampling_batches(dev):
        if quick and n > 1:
            continue
        run_ = sampling.prepare(model, n, (SIZE, SIZE), generator=torch.Generator(dev).manual_seed(1))
        cache = model.allocate_inference_cache(run_)
        pos = ("position work (ul streams) + output layer: one pixelcnnpp_ul_step call" if cache.fused else
               "position work (ul streams), torch ops")
        parts = {"row work (u streams)": 0.0, pos: 0.0, "draw + update" if cache.fused else
                 "output layer + draw + update": 0.0}
        last = list(parts)[2]
        W = SIZE
        with torch.no_grad():
            total0 = time.perf_counter()
            for t in range(SIZE * SIZE):
                i, j = divmod(t, W)
                if j == 0:
                    dt, _ = timed(lambda: cache._rows(i), dev)
                    parts["row work (u streams)"] += dt
                if cache.fused:
                    dt, _ = timed(lambda: cache._op(cache.maps, cache.weights, cache.program, i, j, cache.out_buf,
                                                     check=False), dev)
                    parts[pos] += dt
                    t0 = time.perf_counter()
                    p = cache.out_buf.float()
                else:
                    dt, _ = timed(lambda: cache._position(i, j), dev)
                    parts[pos] += dt
                    t0 = time.perf_counter()
                    h = F.elu(cache.final.at(i, j))
                    p = torch.addmm(cache.out_b, h, cache.out_wt).float()
                v = run_.seq.head.draw(p, run_.noise[t], 1.0)
                cache.update(None, t, v)
                sync(dev)
                parts[last] += time.perf_counter() - t0
            total = time.perf_counter() - total0
            x0 = torch.zeros(n, 3, SIZE, SIZE, dtype=torch.int64, device=dev)
            model.params(x0)
            fwd = statistics.median(timed(lambda: model.params(x0), dev)[0] for _ in range(3))
        for what, sec in parts.items():
            rows.append({"case": f"{name} 32x32x3", "batch": n, "what": f"cached image: {what} s",
                         "fastar": sec, "baseline": None, "ratio": sec / total, "how": "share of the cached image",
                         "same_images": None})
        rows.append({"case": f"{name} 32x32x3", "batch": n, "what": "cached image vs one forward pass (floor) s",
                     "fastar": total, "baseline": fwd, "ratio": total / fwd,
                     "how": "ratio = overhead over the work floor", "same_images": None})
        print(f"  PixelCNN++ breakdown b{n}: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
              + f"; total {total:.2f} s vs one forward {fwd * 1e3:.1f} ms ({total / fwd:.0f}x)", flush=True)
    return rows


def run(device: str, quick: bool = False) -> list[dict]:
    rows = breakdown_rows(device, quick)
    for r in sampling_rows(device, quick):
        rows.append({"case": r["case"], "batch": r["batch"], "what": "sampling s/batch", "fastar": r["cached_s"],
                     "baseline": r["naive_s"], "ratio": r["speedup"], "how": r["naive_how"],
                     "same_images": r["same_images"]})
    return rows + training_rows(device, quick)
