"""WaveNet generation: naive vs the PyTorch queue paths (wavenet_step_ref and a plain PyTorch loop) vs the
fused wavenet_step kernel.

The configuration is nv-wavenet's: R=64, S=256, A=256, 20 layers (2 stacks of 10), kernel 2,
float32, softmax head, no conditioning. Samples per second = batch * steps / seconds. The kernel is
divided by the faster of the two queue paths, so that the ratio holds against plain PyTorch too.
"""
from __future__ import annotations

import collections
import contextlib
import statistics
import time

import torch

from fastar import _backend
from fastar.bench import kernel_built
from fastar.bench.timing import sync
from fastar.models import WaveNet
from fastar.ops.wavenet import queue_sizes, wavenet_step_packed

__all__ = ["FAMILY", "COLUMNS", "NOTES", "BATCHES", "bench_model", "plain_queue_generate", "queue_ref_maker",
           "plain_queue_maker", "run"]

FAMILY = "wavenet"

COLUMNS = ["batch", "naive_sps", "queue_ref_sps", "plain_queue_sps", "fused_sps", "fused_vs_queue",
           "fused_vs_naive", "fused_ms_per_step", "fused_1thread_sps", "queue_threads", "steps_timed"]

NOTES = ("naive = WaveNet.generate(method='naive'): the full forward pass over the receptive-field window "
         "(2047 samples) per sample, timed in steady state (primed with a full window). queue_ref = the PyTorch "
         "queue path, fastar.ops.wavenet_step_ref (the op's reference) over all the timed steps in one call. "
         "plain_queue = fastar.bench.wavenet.plain_queue_generate, a straightforward PyTorch queue loop as a new "
         "user would write it (a deque of past inputs per layer, one addmm per tap, gate, one addmm for residual "
         "+ skip, head, torch.multinomial draw). fused_vs_queue = fused / the faster of queue_ref and plain_queue. "
         "queue_ref and plain_queue are timed with their state allocated outside the timed region, each with 1 "
         "thread and with all threads, the faster kept (queue_threads = ref/plain threads): their tiny GEMMs "
         "suffer from OpenMP contention on a shared machine. fused = WaveNet.generate(method='fast'): "
         "fastar.ops.wavenet_step, one fused C++ loop per step on CPU (256 steps per call), on CUDA a CUDA graph "
         "of 64-step calls: one persistent launch per call at batch <= 8 (weights in shared memory across the "
         "steps, grid barriers between layers), one block-kernel launch per step above. queue_ref, plain_queue "
         "and fused runs are interleaved round-robin and the medians kept, so that all see the same machine "
         "load. sps = samples per second (batch x steps / s). Model: R=64, D=64, S=256, A=256, 20 layers "
         "(2x10), kernel 2, float32. fused_1thread_sps = the fused path with torch.set_num_threads(1) (CPU "
         "only); at batch <= 4 (float32, AVX-512) the CPU kernel cuts the network into two parts whose packed "
         "weights (1.7 MB each) stay in the two cores' L2 caches, one part per thread; above, rows are split "
         "between threads.")

BATCHES = [1, 16, 64, 256]


@contextlib.contextmanager
def _threads(n):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def bench_model(device):
    """The benchmarked WaveNet (R=64, D=64, S=256, A=256, 20 layers in 2 stacks, kernel 2, softmax head), float32,
    in eval mode on ``device``, from seed 0."""
    torch.manual_seed(0)
    return WaveNet(layers=20, stacks=2, residual_channels=64, dilation_channels=64, skip_channels=256,
                   quantization=256, kernel_size=2).to(device).eval()


@torch.no_grad()
def plain_queue_generate(model, samples, generator=None, last_logits=None, weights=None):
    """A plain PyTorch queue loop, written as a new user would: the fairness bar for queue_ref.

    One Python loop over time; per layer a deque of its past inputs (append the newest, the oldest
    drops out), one addmm per tap, the tanh * sigmoid gate, one addmm for residual + skip; the
    two-layer head and a ``torch.multinomial(softmax)`` draw. Softmax head, no conditioning.
    Fills ``samples`` (B, T) int64 in place and returns it; ``last_logits`` (B, A), if given,
    receives the last step's logits; ``weights``: ``model.pack()``, made once by a caller that
    generates repeatedly (as queue_ref's benchmark runs do).
    """
    B, T = samples.shape
    k, R, D = model.kernel_size, model.residual_channels, model.dilation_channels
    w = model.pack() if weights is None else weights
    queues = [collections.deque([w.in_b.new_zeros(B, R)] * ((k - 1) * d), maxlen=(k - 1) * d)
              for d in model.dilations]
    prev = torch.full((B,), model.start_code, dtype=torch.int64, device=samples.device)
    for t in range(T):
        h = w.in_w[prev] + w.in_b
        skip = 0
        for layer, (d, q) in enumerate(zip(model.dilations, queues)):
            a = torch.addmm(w.conv_b[layer], h, w.conv_w[layer, k - 1])
            for j in range(k - 1):
                a = torch.addmm(a, q[j * d], w.conv_w[layer, j])
            q.append(h)
            z = torch.tanh(a[:, :D]) * torch.sigmoid(a[:, D:])
            rs = torch.addmm(w.res_skip_b[layer], z, w.res_skip_w[layer])
            h = h + rs[:, :R]
            skip = skip + rs[:, R:]
        y = torch.relu(torch.addmm(w.out1_b, torch.relu(skip), w.out1_w))
        logits = torch.addmm(w.out2_b, y, w.out2_w)
        prev = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
        samples[:, t] = prev
    if last_logits is not None:
        last_logits.copy_(logits)
    return samples


def queue_ref_maker(m, batch, steps, dev):
    """``make() -> run``: ``make`` allocates fresh state (untimed), ``run()`` generates ``steps`` steps of a
    ``batch`` with :func:`fastar.ops.wavenet_step_ref` (the PyTorch queue path) in one call."""
    with torch.no_grad():
        p = m.pack()

    def make():
        samples = torch.zeros(batch, steps, dtype=torch.int64, device=dev)
        noise = torch.rand(batch, steps, device=dev)
        queues = torch.zeros(batch, sum(queue_sizes(m.dilations, m.kernel_size)), m.residual_channels, device=dev)
        position = torch.zeros(1, dtype=torch.int64, device=dev)
        logits = torch.empty(batch, m.quantization, device=dev)
        return lambda: wavenet_step_packed(samples, queues, position, logits, noise, None, p, 0, 1.0, m.start_code,
                                           num_steps=steps, reference=True)
    return make


def plain_queue_maker(m, batch, steps, dev):
    """``make() -> run`` as :func:`queue_ref_maker`, for :func:`plain_queue_generate` (weights packed once)."""
    with torch.no_grad():
        w = m.pack()

    def make():
        samples = torch.zeros(batch, steps, dtype=torch.int64, device=dev)
        return lambda: plain_queue_generate(m, samples, weights=w)
    return make


def _fused_maker(m, batch, steps):
    def run():
        with _backend.backend("kernel"):
            m.generate(steps, batch_size=batch, progress=False)
    return lambda: run


def _interleaved(makers, device, rounds):
    """Median seconds per entry of ``makers`` (name -> (make, threads)), timed round-robin.

    ``make()`` builds a fresh run (untimed); round 0 is a warm-up. Interleaving makes every entry see
    the same machine load, which on a shared machine moves by tens of percent within a minute.
    """
    times = {name: [] for name in makers}
    for r in range(rounds + 1):
        for name, (make, threads) in makers.items():
            run = make()
            with _threads(threads or torch.get_num_threads()):
                sync(device)
                t0 = time.perf_counter()
                run()
                sync(device)
                if r:
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _time(fn, device, repeat):
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _steps(device, batch, quick):
    cpu = device.type == "cpu"
    naive = 1 if (batch >= 16 and cpu) or quick else 3
    ref = (20 if batch >= 64 else 60) if cpu else 200
    fused = ({1: 4000, 16: 1000, 64: 300, 256: 100}[batch] if cpu else 4000)
    if quick:
        ref, fused = max(5, ref // 10), max(20, fused // 10)
    return naive, ref, fused


def run(device: str, quick: bool = False) -> list[dict]:
    dev = torch.device(device)
    m = bench_model(dev)
    rf = m.receptive_field
    batches = [1, 16] if quick else BATCHES
    cpu = dev.type == "cpu"
    all_threads = torch.get_num_threads()
    thread_counts = sorted({1, all_threads}) if cpu else [None]
    have_kernel = kernel_built("wavenet_step", dev)
    rows = []
    for batch in batches:
        n_naive, n_ref, n_fused = _steps(dev, batch, quick)
        g = torch.Generator().manual_seed(0)
        prime = torch.randint(0, 256, (batch, rf), generator=g).to(dev)
        naive_s = _time(lambda: m.generate(n_naive, prime=prime, method="naive", progress=False), dev,
                        1 if (batch >= 16 or quick) else 3)
        makers = {}
        for th in thread_counts:
            makers[("queue_ref", th)] = (queue_ref_maker(m, batch, n_ref, dev), th)
            makers[("plain", th)] = (plain_queue_maker(m, batch, n_ref, dev), th)
        if have_kernel:
            makers[("fused", None)] = (_fused_maker(m, batch, n_fused), None)
            if cpu and all_threads > 1:
                makers[("fused", 1)] = (_fused_maker(m, batch, n_fused), 1)
        med = _interleaved(makers, dev, 1 if quick else 5)

        def best(name):  # (samples/s, threads) of the faster thread count
            s, th = min((med[(name, th)], th) for th in thread_counts)
            return batch * n_ref / s, th

        ref_sps, ref_threads = best("queue_ref")
        plain_sps, plain_threads = best("plain")
        fused_s, fused1_s = med.get(("fused", None)), med.get(("fused", 1))
        naive_sps = batch * n_naive / naive_s
        fused_sps = batch * n_fused / fused_s if fused_s else None
        queue_sps = max(ref_sps, plain_sps)
        rows.append({"batch": batch, "naive_sps": naive_sps, "queue_ref_sps": ref_sps, "plain_queue_sps": plain_sps,
                     "fused_sps": fused_sps, "fused_vs_queue": fused_sps / queue_sps if fused_sps else None,
                     "fused_vs_naive": fused_sps / naive_sps if fused_sps else None,
                     "fused_ms_per_step": fused_s / n_fused * 1e3 if fused_s else None,
                     "fused_1thread_sps": batch * n_fused / fused1_s if fused1_s else None,
                     "queue_threads": f"{ref_threads}/{plain_threads}" if cpu else None,
                     "steps_timed": f"{n_naive}/{n_ref}/{n_fused}"})
        print(f"  batch {batch:>3}: naive {naive_sps:10.1f}  queue_ref {ref_sps:10.1f}  plain_queue "
              f"{plain_sps:10.1f}  fused {fused_sps or 0:12.1f} samples/s", flush=True)
    return rows
