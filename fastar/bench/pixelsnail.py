"""PixelSNAIL sampling: naive (a full forward pass per pixel) vs the key/value-cached engine, and the
cached attention step against the floor of reading its key/value cache once.

``python -m fastar bench pixelsnail`` (also part of ``python -m fastar bench sampling``, whose table
gains these rows). Two untrained float32 models (speed does not depend on training):

- ``pixelsnail 32x32x3``: 256 levels a value, a 10-component logistic mixture drawing a pixel's R,
  G and B jointly, channels 64, 2 blocks of 2 gated residual blocks, kernel 2, keys 16, values 64;
- ``code prior 32x32``: 512 codes (a VQ-VAE prior's size), the same network with a categorical head.

Batch 1 and 16 (and 256 on a GPU). A naive run longer than ``NAIVE_BUDGET_S`` is extrapolated
(pixels x the median full pass, ``naive_how``); cached runs and full passes are
timed interleaved (three rounds of one cached run and two passes), medians. The ``attention`` rows time one cached
attention step (``CausalSelfAttention2d.step_query``: one query against the first t keys and
values, t = the last position, the worst case) against its floor, the time to read those t keys
and values once (``torch.sum`` over the same bytes, measured beside it: the memory rate of the cache
level they sit in), and give the step's share of a whole cached sampling step.
"""
from __future__ import annotations

import statistics

import torch

from fastar import sampling
from fastar.bench.timing import sampling_batches, sync, time_fn, time_interleaved, timed

FAMILY = "pixelsnail"

COLUMNS = ["case", "batch", "steps", "naive_s", "naive_how", "cached_s", "speedup", "cached_ms_per_step",
           "same_images", "attn_step_us", "floor_us", "attn_vs_floor", "kv_bytes", "attn_share"]

NOTES = ("Time to sample one batch (seconds), untrained float32 weights. naive = one full forward pass per pixel "
         "(plain PyTorch: F.conv2d and scaled_dot_product_attention over the whole image); cached = the "
         "fastar.sampling engine with PixelSNAIL's cache (causal-conv windows + key/value caches, one position "
         "per layer per step). naive_how 'extrapolated' = pixels x the median full pass. speedup = naive_s / "
         "cached_s. Three rounds, each one cached run then two full passes (interleaved: the shared machine's "
         "load reaches both alike); cached_s and the pass are the medians. attention rows: attn_step_us = one cached attention step "
         "at the last position (1023 keys and values), floor_us = reading those keys and values once (torch.sum "
         "over the same bytes), attn_vs_floor = their ratio, attn_share = the step's share of a whole cached "
         "sampling step (all attention layers, at the average position t = L/2 the engine's steps see).")

NAIVE_BUDGET_S = 60.0

SIZE = 32
_NET = dict(channels=64, n_blocks=2, n_res_blocks=2, kernel_size=2, key_channels=16, value_channels=64)
CASES = [
    ("pixelsnail 32x32x3", dict(in_channels=3, nr_logistic_mix=10, **_NET)),
    ("code prior 32x32", dict(in_channels=1, levels=512, **_NET)),
]


def build(config, device):
    from fastar.models import PixelSNAIL

    torch.manual_seed(0)
    return PixelSNAIL(**config).to(device).eval()


def sampling_rows(device: str, quick: bool = False) -> list[dict]:
    """Naive vs cached sampling rows (the columns of :mod:`fastar.bench.sampling`'s table)."""
    dev = torch.device(device)
    rows = []
    for name, config in CASES:
        model = build(config, dev)
        C = config["in_channels"]
        for n in sampling_batches(dev):
            if quick and n > 1:
                continue
            steps = SIZE * SIZE

            def cached():
                plan = sampling.prepare(model, n, (SIZE, SIZE), generator=torch.Generator(dev).manual_seed(1))
                return sampling.cached_sample(model, plan)

            x0 = torch.zeros(n, C, SIZE, SIZE, dtype=torch.int64, device=dev)
            with torch.no_grad():
                model(x0)                                                          # warm-up
            cached()
            # Interleaved: each round one whole cached run, then two full passes, so that the shared machine's
            # load reaches both alike; medians over the rounds.
            times, passes, x_cached = [], [], None
            for _ in range(1 if quick else 3):
                t, x_cached = timed(cached, dev)
                times.append(t)
                with torch.no_grad():
                    passes += [timed(lambda: model(x0), dev)[0] for _ in range(2)]
            cached_s, pass_s = statistics.median(times), statistics.median(passes)
            estimate = steps * pass_s
            same = None
            if estimate <= NAIVE_BUDGET_S and not quick:
                plan = sampling.prepare(model, n, (SIZE, SIZE), generator=torch.Generator(dev).manual_seed(1))
                naive_s, x_naive = timed(lambda: sampling.naive_sample(model, plan), dev)
                how = "full run"
                same = bool(torch.equal(x_naive, x_cached))
            else:
                naive_s, how = estimate, "extrapolated"
            rows.append({"case": name, "batch": n, "steps": steps, "naive_s": naive_s, "naive_how": how,
                         "cached_s": cached_s, "speedup": naive_s / cached_s,
                         "cached_ms_per_step": cached_s / steps * 1e3, "same_images": same})
            print(f"  {name:<20} b{n:<4} naive {naive_s:9.2f} s ({how})  cached {cached_s:7.3f} s  "
                  f"x{naive_s / cached_s:.0f}", flush=True)
    return rows


def attention_rows(device: str, quick: bool = False) -> list[dict]:
    """The cached attention step against reading its key/value cache once (see the module docstring)."""
    dev = torch.device(device)
    rows = []
    name, config = CASES[0]
    model = build(config, dev)
    layer = model.blocks[0].attn
    L = SIZE * SIZE
    for n in sampling_batches(dev):
        if quick and n > 1:
            continue
        g = torch.Generator(dev).manual_seed(0)
        cache = layer.new_cache(n, L)
        cache.kt.copy_(torch.randn(cache.kt.shape, generator=g, device=dev))
        cache.v.copy_(torch.randn(cache.v.shape, generator=g, device=dev))
        q = torch.randn(n, layer.in_channels, generator=g, device=dev)
        t = torch.tensor([L - 1], device=dev)
        length = None if dev.type == "cuda" else L - 1
        k_used, v_used = cache.kt[..., :L - 1], cache.v[:, :, :L - 1]
        kv_bytes = (k_used.numel() + v_used.numel()) * k_used.element_size()
        with torch.no_grad():
            res = time_interleaved({
                "step": lambda: layer.step_query(q, cache, t, length),
                "floor": lambda: (k_used.sum(), v_used.sum()),
            }, dev, warmup=5, repeat=50 if quick else 400)
            # the share of a whole cached step: the engine's steps at the average position
            run = sampling.prepare(model, n, (SIZE, SIZE), generator=torch.Generator(dev).manual_seed(1))
            c = model.allocate_inference_cache(run)
            half = L // 2
            run.t.fill_(half)
            step_ms = time_fn(lambda: c.step("step", half), dev, warmup=3, repeat=20 if quick else 100)["median_ms"]
            attn_half_ms = time_fn(lambda: layer.step_query(q, cache, torch.tensor([half], device=dev),
                                                            None if dev.type == "cuda" else half),
                                   dev, warmup=3, repeat=20 if quick else 200)["median_ms"]
        a, f = res["step"]["median_ms"] * 1e3, res["floor"]["median_ms"] * 1e3
        share = len(model.blocks) * attn_half_ms / step_ms
        rows.append({"case": f"attention step ({name}, t={L - 1})", "batch": n, "attn_step_us": a, "floor_us": f,
                     "attn_vs_floor": a / f, "kv_bytes": kv_bytes, "attn_share": share})
        print(f"  attention b{n:<4} step {a:8.1f} us  floor {f:8.1f} us  x{a / f:.2f}  "
              f"share of a step {share:.0%}", flush=True)
    return rows


def run(device: str, quick: bool = False) -> list[dict]:
    return sampling_rows(device, quick) + attention_rows(device, quick)
