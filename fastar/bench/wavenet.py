"""WaveNet generation: naive vs the PyTorch queue path (wavenet_step_ref) vs the fused wavenet_step kernel.

Config of the issue (nv-wavenet's): R=64, S=256, A=256, 20 layers (2 stacks of 10), kernel 2,
float32, softmax head, no conditioning. Samples per second = batch * steps / seconds.
"""
from __future__ import annotations

import collections
import contextlib
import statistics
import time

import torch

from fastar import _backend
from fastar.bench.timing import sync
from fastar.models import WaveNet

COLUMNS = ["batch", "naive_sps", "queue_ref_sps", "fused_sps", "fused_vs_queue_ref", "fused_vs_naive",
           "fused_ms_per_step", "fused_1thread_sps", "queue_ref_threads", "steps_timed"]

NOTES = ("naive = WaveNet.generate(method='naive'): the full forward pass over the receptive-field window "
         "(2047 samples) per sample, timed in steady state (primed with a full window). queue_ref = the PyTorch "
         "queue path (fastar.ops.wavenet_step_ref, a few torch ops per layer and step). fused = "
         "WaveNet.generate(method='fast'): fastar.ops.wavenet_step, one fused C++ loop per step on CPU (256 steps "
         "per call), on CUDA a CUDA graph of 64-step calls: one persistent launch per call at batch <= 8 (weights in shared memory across the steps, grid barriers between layers), one block-kernel launch per step above. sps = samples per second "
         "(batch x steps / s), median of the repeats. Model: R=64, D=64, S=256, A=256, 20 layers (2x10), "
         "kernel 2, float32. queue_ref is timed with 1 thread and with all threads and the faster is kept "
         "(queue_ref_threads): its tiny GEMMs suffer from OpenMP contention on a shared machine. "
         "fused_1thread_sps = the fused path with torch.set_num_threads(1) (CPU only); at batch <= 4 (float32, "
         "AVX-512) the CPU kernel cuts the network into two parts whose packed weights (1.7 MB each) stay in "
         "the two cores' L2 caches, one part per thread; above, rows are split between threads.")

BATCHES = [1, 16, 64, 256]


@contextlib.contextmanager
def _threads(n):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _model(device):
    torch.manual_seed(0)
    return WaveNet(layers=20, stacks=2, residual_channels=64, dilation_channels=64, skip_channels=256,
                   quantization=256, kernel_size=2).to(device).eval()


@torch.no_grad()
def plain_queue_generate(model, samples, generator=None):
    """A plain PyTorch queue step loop, written as a new user would: the fairness bar for queue_ref.

    One Python loop over time; per layer a deque of its past inputs (append the newest, the oldest
    drops out), one addmm per tap, the tanh * sigmoid gate, one addmm for residual + skip; the
    two-layer head and a ``torch.multinomial(softmax)`` draw. Softmax head, no conditioning.
    Fills ``samples`` (B, T) int64 in place and returns it.
    """
    B, T = samples.shape
    k, R, D = model.kernel_size, model.residual_channels, model.dilation_channels
    w = model.pack()
    acc = w["conv_w"].dtype
    queues = [collections.deque([samples.new_zeros(B, R, dtype=acc)] * ((k - 1) * d), maxlen=(k - 1) * d)
              for d in model.dilations]
    prev = torch.full((B,), model.start_code, dtype=torch.int64, device=samples.device)
    for t in range(T):
        h = w["in_w"][prev] + w["in_b"]
        skip = 0
        for layer, (d, q) in enumerate(zip(model.dilations, queues)):
            a = torch.addmm(w["conv_b"][layer], h, w["conv_w"][layer, k - 1])
            for j in range(k - 1):
                a = torch.addmm(a, q[j * d], w["conv_w"][layer, j])
            q.append(h)
            z = torch.tanh(a[:, :D]) * torch.sigmoid(a[:, D:])
            rs = torch.addmm(w["res_skip_b"][layer], z, w["res_skip_w"][layer])
            h = h + rs[:, :R]
            skip = skip + rs[:, R:]
        y = torch.relu(torch.addmm(w["out1_b"], torch.relu(skip), w["out1_w"]))
        logits = torch.addmm(w["out2_b"], y, w["out2_w"])
        prev = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
        samples[:, t] = prev
    return samples


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
    m = _model(dev)
    rf = m.receptive_field
    batches = [1, 16] if quick else BATCHES
    rows = []
    for batch in batches:
        n_naive, n_ref, n_fused = _steps(dev, batch, quick)
        g = torch.Generator().manual_seed(0)
        prime = torch.randint(0, 256, (batch, rf), generator=g).to(dev)
        naive_s = _time(lambda: m.generate(n_naive, prime=prime, method="naive", progress=False), dev,
                        1 if (batch >= 16 or quick) else 3)
        samples = torch.zeros(batch, n_ref, dtype=torch.int64, device=dev)
        noise = torch.rand(batch, n_ref, device=dev)
        ref_s, ref_threads = _time(lambda: m.generate_reference_queue(samples, noise), dev, 1 if quick else 3), None
        if dev.type == "cpu":
            ref_threads = torch.get_num_threads()
            if ref_threads > 1:
                with _threads(1):
                    one = _time(lambda: m.generate_reference_queue(samples, noise), dev, 1 if quick else 3)
                if one < ref_s:
                    ref_s, ref_threads = one, 1
        kernel_built = "wavenet_step" in (_backend.CUDA_KERNELS if dev.type == "cuda" else _backend.CPU_KERNELS)
        fused_s = fused1_s = None
        if kernel_built:
            with _backend.backend("kernel"):
                fused_s = _time(lambda: m.generate(n_fused, batch_size=batch, progress=False), dev, 3)
                if dev.type == "cpu" and torch.get_num_threads() > 1:
                    with _threads(1):
                        fused1_s = _time(lambda: m.generate(n_fused, batch_size=batch, progress=False), dev, 3)
        naive_sps = batch * n_naive / naive_s
        ref_sps = batch * n_ref / ref_s
        fused_sps = batch * n_fused / fused_s if fused_s else None
        rows.append({"batch": batch, "naive_sps": naive_sps, "queue_ref_sps": ref_sps, "fused_sps": fused_sps,
                     "fused_vs_queue_ref": fused_sps / ref_sps if fused_sps else None,
                     "fused_vs_naive": fused_sps / naive_sps if fused_sps else None,
                     "fused_ms_per_step": fused_s / n_fused * 1e3 if fused_s else None,
                     "fused_1thread_sps": batch * n_fused / fused1_s if fused1_s else None,
                     "queue_ref_threads": ref_threads,
                     "steps_timed": f"{n_naive}/{n_ref}/{n_fused}"})
        print(f"  batch {batch:>3}: naive {naive_sps:10.1f}  queue_ref {ref_sps:10.1f}  fused "
              f"{fused_sps or 0:12.1f} samples/s", flush=True)
    return rows
