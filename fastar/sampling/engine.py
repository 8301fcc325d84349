"""The one generation engine of fastar: every autoregressive model, images and audio alike.

In the manner of mamba's ``generation.py``: the model states its sequence and offers a cache
with a step; the engine owns the rest.

- The model: ``model.sequence(n, shape, cond, **given) -> Sequence`` (how many steps, the
  distribution head, where each step's value lives, the given values, the naive full forward),
  and optionally ``model.allocate_inference_cache(run) -> InferenceCache``.
- The engine: checks n and temperature, draws every uniform up front
  (``torch.rand((T, n, head.uniforms), generator)``, float64 for a float64 model, else float32),
  applies the given values (image prefix + mask, audio prime), runs the decode loop with a
  tqdm progress bar, captures and replays CUDA graphs (one graph per distinct kind of step the
  cache reports) and runs the naive baseline: one full forward pass per step.

Because every method draws from the same uniforms with the head's inverse-CDF draw, ``naive``,
the cached per-op path and a fused kernel that draws inside return the same values from one
seed (exactly in float64; in float32 up to a rounding landing on a CDF boundary).
"""
from __future__ import annotations

import inspect
import math

import torch

from fastar.sampling.protocol import ForwardCache, GenerationRun, Sequence
from fastar.threads import StepThreads

__all__ = ["sample", "prepare", "cached_sample", "naive_sample", "drive", "GraphRunner", "progress_bar"]


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar, or an object with the same ``update``/``close`` that does nothing."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc)


def _check_common(name, n, temperature):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name}.sample: n must be a positive int, got {n!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{name}.sample: temperature must be a finite number >= 0, got {temperature!r}")


def _accepts(fn, name) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _given(name, seq: Sequence, table, prefix, mask, prime, device):
    """The call's prefix / mask and prime as (N, S) values and mask in the slot layout, or (None, None)."""
    head, n, S = seq.head, seq.n, table.numel()
    V = table.shape[1]
    gv = gm = None
    if prefix is not None:
        out = seq.output_slots()
        want = [n, *seq.shape]
        if not isinstance(prefix, torch.Tensor) or list(prefix.shape) != want:
            raise ValueError(f"{name}.sample: prefix must have the shape sample returns, {want}, got "
                             f"{list(getattr(prefix, 'shape', [])) if isinstance(prefix, torch.Tensor) else type(prefix).__name__}")
        if mask is None:
            raise ValueError(f"{name}.sample: prefix needs a mask (bool, broadcastable to {want}, True where the "
                             "prefix is given)")
        m = torch.as_tensor(mask, device=device)
        if m.dtype != torch.bool:
            raise ValueError(f"{name}.sample: mask must be bool (True = given), got {m.dtype}")
        try:
            m = m.expand(*want)
        except RuntimeError:
            raise ValueError(f"{name}.sample: mask of shape {list(m.shape)} does not broadcast to {want}") from None
        p = prefix.to(device)
        if seq.encode is not None:              # only the given values are the caller's to check: zeros elsewhere
            p = seq.encode(torch.where(m, p, torch.zeros((), dtype=p.dtype, device=device)))
        p = head.check_values(torch.where(m, p, torch.zeros((), dtype=p.dtype, device=device)), f"{name}.sample: prefix")
        gv = torch.zeros(n, S, dtype=p.dtype, device=device)
        gm = torch.zeros(n, S, dtype=torch.bool, device=device)
        idx = out.to(device)
        gv.index_copy_(1, idx, p.reshape(n, -1))
        gm.index_copy_(1, idx, m.reshape(n, -1))
    elif mask is not None:
        raise ValueError(f"{name}.sample: mask given without a prefix")
    if prime is not None:
        P = seq.num_prime
        p = prime.to(device)
        if seq.encode is not None:
            p = seq.encode(p)
        if p.dim() == 2 and V == 1:
            p = p.unsqueeze(2)
        if tuple(p.shape) != (n, P, V):
            raise ValueError(f"{name}.sample: prime must be (N, P{', V' if V > 1 else ''}) = "
                             f"{[n, P] + ([V] if V > 1 else [])}, got {list(prime.shape)}")
        p = head.check_values(p, f"{name}.sample: prime")
        cols = table[:P].flatten().to(device)
        if gv is None:
            gv = torch.zeros(n, S, dtype=p.dtype, device=device)
            gm = torch.zeros(n, S, dtype=torch.bool, device=device)
        gv = gv.to(torch.promote_types(gv.dtype, p.dtype))
        gv.index_copy_(1, cols, p.reshape(n, -1).to(gv.dtype))
        gm.index_fill_(1, cols, True)
    if gm is not None and V > 1:
        per_step = gm[:, table.flatten().to(device)].view(n, -1, V)
        if bool((per_step.any(2) != per_step.all(2)).any()):
            raise ValueError(f"{name}.sample: a step draws its {V} values jointly, so the mask must give all {V} "
                             "values of a step or none")
    return gv, gm


def prepare(model, n=None, shape=None, cond=None, generator=None, temperature=1.0, prefix=None, mask=None,
            prime=None, *, record=False) -> GenerationRun:
    """Check the arguments of a ``sample`` call, ask the model for its :class:`Sequence`, map the
    given values (``prefix`` + ``mask`` in the layout ``sample`` returns; ``prime`` (N, P) the first
    P steps of a sequence model) into the slot layout, and draw every uniform up front.
    ``record``: keep every step's distribution parameters."""
    name = type(model).__name__
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"{name}.sample: generator must be a torch.Generator or None, got "
                         f"{type(generator).__name__} {generator!r}")
    kw = {}
    if prime is not None:
        if not _accepts(model.sequence, "num_prime"):
            raise ValueError(f"{name}.sample: this model takes no prime; give known values as prefix= and mask=")
        if not isinstance(prime, torch.Tensor) or prime.dim() not in (2, 3):
            raise ValueError(f"{name}.sample: prime must be a (N, P) tensor of the first P values, got "
                             f"{list(prime.shape) if isinstance(prime, torch.Tensor) else type(prime).__name__}")
        if n is not None and n != prime.shape[0]:
            raise ValueError(f"{name}.sample: prime has batch {prime.shape[0]} but n is {n}")
        n = prime.shape[0]
        kw["num_prime"] = prime.shape[1]
    if prefix is not None and isinstance(prefix, torch.Tensor) and prefix.dim() >= 1:
        if n is None:
            n = prefix.shape[0]
        if shape is None:
            shape = tuple(prefix.shape[1:])
    seq = model.sequence(n, shape, cond, **kw)
    if not isinstance(seq, Sequence):
        raise TypeError(f"{name}.sequence must return a fastar.sampling.Sequence, got {type(seq).__name__}")
    _check_common(name, seq.n, temperature)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    table = seq.slot_table()
    gv, gm = _given(name, seq, table, prefix, mask, prime, device)
    gdev = generator.device if generator is not None else device
    noise = torch.rand((seq.steps, seq.n, seq.head.uniforms), generator=generator, device=gdev,
                       dtype=acc).to(device)
    return GenerationRun(model, seq, noise, float(temperature), device, dtype, acc, record, gv, gm)


def _draw_step(run: GenerationRun, params: torch.Tensor) -> torch.Tensor:
    """The engine's draw for the step at ``run.t``: head draw on its uniforms, given values, write.
    Returns the step's values (N, V)."""
    seq = run.seq
    t = run.t
    u = run.noise.index_select(0, t).squeeze(0)                       # (N, U)
    v = seq.head.draw(params, u, run.temperature).to(run.values.dtype)    # (N, V)
    s = run.slot_table.index_select(0, t).squeeze(0)                  # (V,)
    if run.given_mask is not None:
        v = torch.where(run.given_mask.index_select(1, s), run.given_values.index_select(1, s), v)
    run.values.index_copy_(1, s, v)
    return v


class GraphRunner:
    """Runs a step eagerly the first time (warm-up), captures it in a CUDA graph the second time, and
    replays it after. The step must read its position from device tensors only."""

    def __init__(self, fn):
        self.fn, self.calls, self.graph = fn, 0, None

    def __call__(self):
        if self.calls == 0:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                self.fn()
            torch.cuda.current_stream().wait_stream(s)
        elif self.calls == 1:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.fn()
            self.graph.replay()
        else:
            self.graph.replay()
        self.calls += 1


def _allocate(model, run, fused):
    alloc = getattr(model, "allocate_inference_cache", None)
    if alloc is None:
        if fused:
            raise ValueError(f"fused=True: {type(model).__name__} has no inference cache (no fused step)")
        return ForwardCache(run)
    return alloc(run, fused=fused)


@torch.no_grad()
def cached_sample(model, run: GenerationRun, progress: bool = False, cuda_graphs: bool | None = None,
                  fused: bool | None = None):
    """The decode loop over the model's inference cache; returns what ``model.sample`` returns
    (and, when the run records, the per-step parameters (T, N, P) as a second value).

    cuda_graphs: None = on for CUDA models (unless the run records), False = eager steps.
    fused: None = the cache uses its fused op when it is built for the device and dtype;
    False = the per-op path; True = the fused op (its PyTorch twin under the reference backend).
    """
    use_graphs = (run.device.type == "cuda" and not run.record) if cuda_graphs is None else cuda_graphs
    if use_graphs and run.device.type != "cuda":
        raise ValueError("cuda_graphs=True needs the model on a CUDA device")
    cache = _allocate(model, run, fused)
    if cuda_graphs and not cache.capturable:
        raise ValueError(f"cuda_graphs=True: {type(cache).__name__} steps cannot be captured in a CUDA graph")
    use_graphs = use_graphs and cache.capturable
    T = run.seq.steps
    recs = [] if run.record else None
    runners = {}

    def work(key, t, k):
        if cache.draws:
            cache.advance(key, t, k)        # the fused op draws from run.noise and moves run.t itself
            return cache.params
        params = cache.step(key, t)
        v = _draw_step(run, params)
        cache.update(key, t, v)
        run.t.add_(1)
        return params

    bar = progress_bar(T, progress, f"{type(model).__name__} cached sampling")
    threads = StepThreads(model, run)       # CPU: one thread or all, per kind of step, by measuring
    t = 0
    try:
        while t < T:
            key, k = cache.plan(t)
            # Recording keeps every step's parameters, so every cache goes one step at a time then.
            k = max(1, min(int(k), T - t)) if cache.draws and not run.record else 1
            if use_graphs:
                fn = runners.get((key, k))
                if fn is None:
                    # A captured step reads its position from run.t; the host t it was captured at is
                    # only for caches that are not capturable.
                    fn = runners[(key, k)] = GraphRunner(lambda key=key, k=k, t0=t: work(key, t0, k))
                fn()
                params = cache.params if cache.draws else None
            else:
                token = threads.before(key, k)
                params = work(key, t, k)
                threads.after(token)
            if recs is not None:
                recs.append(params.clone())     # fused steps reuse their parameter buffer
            t += k
            bar.update(k)
    finally:
        threads.close()
    bar.close()
    out = run.seq.finish_values(run.values)
    return (out, torch.stack(recs)) if recs is not None else out


@torch.no_grad()
def drive(model, run: GenerationRun, supply, progress: bool = False, desc: str | None = None,
          fused: bool | None = False):
    """The cached decode loop with every step's values supplied by the caller instead of drawn: the
    seam of the codec (its encoder supplies the data, teacher-forced; its decoder supplies what the
    entropy coder decodes from each step's parameters). For each step t, ``supply(t, params (N, P))``
    returns the step's values (N, V) in the head's value dtype; they are written at the step's slots
    and fed back to the cache. Returns what ``sample`` returns.

    The path: the per-op ``step`` / ``update`` (``fused=False``), or (``fused=None``) the model's
    default cache when it is per-op or a fused cache that ``reads_values`` (run one step a call, its
    draw overwritten by the supplied values before the next step reads them). Eager, one step a call,
    on the host step index, with no thread switching (pin the count around the call, e.g.
    :func:`fastar.threads.pinned`): two loops that are supplied the same values compute the same
    parameters bit for bit on one machine, build, thread count, dtype and device, and that is the
    property the codec's encoder and decoder rest on. The run's given values are not read."""
    cache = _allocate(model, run, fused)
    if cache.draws and not cache.reads_values:
        cache = _allocate(model, run, False)
    if cache.draws and not cache.reads_values:
        raise ValueError(f"{type(model).__name__}'s inference cache has no per-op path (fused=False still draws "
                         "inside), so its step parameters cannot be read one step at a time")
    T = run.seq.steps
    bar = progress_bar(T, progress, desc or f"{type(model).__name__} steps")
    try:
        for t in range(T):
            key, _ = cache.plan(t)
            if cache.draws:
                cache.advance(key, t, 1)            # draws into run.values[:, slots[t]] and moves run.t
                params = cache.params
            else:
                params = cache.step(key, t)
            v = supply(t, params).to(run.values.dtype)
            run.values.index_copy_(1, run.slot_table[t], v)
            if not cache.draws:
                cache.update(key, t, v)
                run.t.add_(1)
            bar.update()
    finally:
        bar.close()
    return run.seq.finish_values(run.values)


@torch.no_grad()
def naive_sample(model, run: GenerationRun, progress: bool = False):
    """The baseline: one full forward pass of the model (``Sequence.forward``) per step."""
    seq = run.seq
    all_given = None
    if run.given_mask is not None:
        all_given = run.given_mask.all(0)[run.slot_table.flatten()].view(seq.steps, -1).all(1).tolist()
    recs = [] if run.record else None
    bar = progress_bar(seq.steps, progress, f"{type(model).__name__} naive sampling")
    for t in range(seq.steps):
        if all_given is not None and all_given[t] and recs is None:
            run.t.add_(1)                   # the whole batch has this step given: no need to run the network
            bar.update()
            continue
        params = seq.forward(run.values, t)
        _draw_step(run, params)
        run.t.add_(1)
        if recs is not None:
            recs.append(params)
        bar.update()
    bar.close()
    out = seq.finish_values(run.values)
    return (out, torch.stack(recs)) if recs is not None else out


def sample(model, n=None, shape=None, cond=None, generator=None, temperature=1.0, method="cached", progress=True,
           fused=None, cuda_graphs=None, return_params=False, prefix=None, mask=None, prime=None):
    """Draw from any model on the protocol (see :class:`fastar.models.AutoregressiveModel.sample`).
    ``prefix`` + ``mask``: known values in the layout ``sample`` returns (True = given); ``prime``:
    the first P values of a sequence model. ``return_params``: also return every step's
    distribution parameters, (T, N, P) in step order."""
    name = type(model).__name__
    if method not in ("cached", "naive"):
        raise ValueError(f"{name}.sample: method must be 'cached' or 'naive', got {method!r}")
    was_training = model.training
    model.eval()
    try:
        run = prepare(model, n, shape, cond, generator, temperature, prefix, mask, prime, record=return_params)
        if method == "naive":
            return naive_sample(model, run, progress=progress)
        return cached_sample(model, run, progress=progress, cuda_graphs=cuda_graphs, fused=fused)
    finally:
        model.train(was_training)
