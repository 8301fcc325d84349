"""Lossless compression and anomaly scores from a model's exact conditionals.

``encode(model, x, cond=None) -> bytes`` and ``decode(model, data) -> x`` work for every model on
the generation protocol (:mod:`fastar.sampling`) whose head is discrete over a finite support
(``Bernoulli``, ``Categorical``, ``DiscretizedMixLogistic`` / ``LogisticMixture`` over their bins,
any joint step whose support has at most :data:`MAX_SUPPORT` values or whose head gives its values'
chain-rule factors), with no code for any family: the model states its
:class:`~fastar.sampling.Sequence`, the engine's :func:`~fastar.sampling.drive` runs its cached step
loop, the head gives every step's whole distribution (``support_log_probs``: one symbol a step), or,
for a step of V values drawn jointly (a discretized logistic mixture's R, G, B: 2**24 joint values),
each value's distribution given the step's earlier ones (``value_log_probs``: R, then G given R,
then B given R and G, V symbols a step), and ``constriction``'s ANS coder turns the distributions
into bits.

Bit-exact by construction. The encoder runs the very step loop the decoder runs (teacher-forced:
the data supplies every step's values, in the same batches), so both see the same parameters bit
for bit, as long as nothing else changes: the machine's instruction set, the torch / fastar /
constriction build, the backend, dtype and device are in a hash the header keeps (a mismatch is
refused), and the CPU thread count is pinned to one for the whole loop (:func:`fastar.threads.pinned`),
whatever ``FASTAR_CPU_THREADS`` or ``torch.set_num_threads`` say. Each step's probabilities are
quantised to integer frequencies out of 2**24 with a floor of one (no value ever has zero mass, so
any input is codable, however unlikely), computed in float64 from the head's log-probabilities.

The file (format 1), all integers little-endian or LEB128 varints::

    byte 0      0xF0 | format version
    byte 1      (model hash & 0xF) << 4 | (environment hash & 0xF)   (a quick, named refusal)
    byte 2      flags: cond kind (2 bits), chunk == n (1 bit), ndim (3 bits), labels in runs (1 bit)
    varints     n, [chunk], shape..., cond header (labels: their maximum; other: serialised)
    payload     the ANS words, little-endian, less up to 3 trailing zero bytes
    4 bytes     CRC-32 over the full model and environment hashes, the header and the payload

So a one-digit file costs 12 bytes beyond the ANS stream (itself about 3 bytes over the
information). Class labels (int64 (n,) conds) are coded in the stream, the cheaper of two ways
(the flag says which): each label at log2(max + 1) bits, or, for labels that come in runs (a set
grouped or sorted by class), the runs: their count, then each run's label (the first at
log2(max + 1) bits, later ones at log2(max) as they differ from the one before) and length (uniform
over what the later runs leave). The maximum is in the header, so a single example's label costs
no stream bits. Any other conditioning is stored raw in the header. A truncated, corrupted or foreign file, the
wrong model, or another environment is one :class:`ValueError`, before any decoding starts; and
after decoding the ANS coder must be back at its empty start state (a decoder whose probabilities
drifted ends elsewhere), another ValueError.

Scores: :func:`score` is bits per dimension (the NLL of the teacher-forced forward pass, in
bits); for a class-conditional model given no labels, the uniform mixture over the classes,
-log2(mean_c p(x | c)) / D, a proper likelihood of x alone.
"""
from __future__ import annotations

import hashlib
import math
import struct
import zlib

import numpy as np
import torch

__all__ = ["encode", "decode", "check", "score", "best_labels", "nll_bits", "label_bits", "header", "FORMAT_VERSION", "MAX_SUPPORT",
           "PRECISION"]

FORMAT_VERSION = 1
MAGIC = 0xF0
PRECISION = 24              # frequencies are integers out of 2**24 (constriction's ANS precision)
MAX_SUPPORT = 1 << 16       # a step's support: the most values one categorical symbol may range over
CHUNK_BUDGET = 1 << 24      # encoder memory: steps x batch x support entries held at once (float64)

_COND_NONE, _COND_LABELS, _COND_RAW = 0, 1, 2
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
           torch.bool, torch.int16, torch.int8]


# ------------------------------------------------------------------------------------------- bytes

def _varint(v: int) -> bytes:
    if v < 0:
        raise ValueError(f"varint of a negative number {v}")
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes, end: int):
        self.data, self.pos, self.end = data, 0, end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise ValueError("fastar codec: the file is truncated (its header ends early)")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        v, shift = 0, 0
        while True:
            b = self.byte()
            v |= (b & 0x7F) << shift
            if not b & 0x80:
                return v
            shift += 7
            if shift > 63:
                raise ValueError("fastar codec: a header number is too long (not a fastar codec file?)")

    def take(self, k: int) -> bytes:
        if k < 0 or self.pos + k > self.end:
            raise ValueError("fastar codec: the file is truncated (a header field runs past its end)")
        out = self.data[self.pos:self.pos + k]
        self.pos += k
        return out


def _put_tensor(t) -> bytes:
    if t is None:
        return b"\xff"
    if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPES:
        raise ValueError(f"fastar codec: conditioning must be tensors (or a tuple of tensors / None), got "
                         f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
    a = t.detach().cpu().contiguous()
    raw = a.view(torch.uint8).numpy().tobytes() if a.numel() else b""
    return bytes([_DTYPES.index(t.dtype), a.dim()]) + b"".join(_varint(s) for s in a.shape) + raw


def _get_tensor(r: _Reader):
    code = r.byte()
    if code == 0xFF:
        return None
    if code >= len(_DTYPES):
        raise ValueError("fastar codec: the stored conditioning has an unknown dtype (corrupt file?)")
    dt = _DTYPES[code]
    shape = [r.varint() for _ in range(r.byte())]
    count = math.prod(shape)
    item = torch.empty((), dtype=dt).element_size()
    raw = r.take(count * item)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt).reshape(shape).clone() if count else \
        torch.empty(shape, dtype=dt)


def _put_cond(cond) -> bytes:
    if isinstance(cond, (tuple, list)):
        return bytes([1 if isinstance(cond, tuple) else 2]) + _varint(len(cond)) + b"".join(_put_tensor(c) for c in cond)
    return b"\x00" + _put_tensor(cond)


def _get_cond(r: _Reader):
    kind = r.byte()
    if kind == 0:
        return _get_tensor(r)
    if kind in (1, 2):
        items = [_get_tensor(r) for _ in range(r.varint())]
        return tuple(items) if kind == 1 else items
    raise ValueError("fastar codec: the stored conditioning is malformed (corrupt file?)")


# ------------------------------------------------------------------------------------- fingerprints

def _model_hash(model) -> bytes:
    """SHA-256 of what the model computes with: its class, its module tree (every layer's
    configuration, as ``repr`` shows it) and every parameter and buffer (names, shapes, values; the
    floats as float64, so the same weights in another dtype hash alike: the dtype is the
    environment's)."""
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}\n".encode())
    for name, t in model.state_dict().items():
        a = t.detach().cpu()
        a = (a.double() if a.is_floating_point() else a.to(torch.int64)).contiguous()
        h.update(f"{name}|{list(a.shape)}\n".encode())
        if a.numel():
            h.update(a.numpy().tobytes())
    return h.digest()


def _environment(model) -> dict:
    """What else a step's bits depend on (besides the pinned thread count): dtype, device, backend,
    builds, the CPU's instruction set."""
    import constriction

    from fastar import __version__, _backend

    p = next(model.parameters())
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except Exception:       # older torch
        isa = "unknown"
    cons = getattr(constriction, "__version__", None)
    if cons is None:
        try:
            from importlib.metadata import version

            cons = version("constriction")
        except Exception:
            cons = "unknown"
    return {"format": FORMAT_VERSION, "dtype": str(p.dtype).replace("torch.", ""), "device": p.device.type,
            "backend": _backend.get_backend(), "extension": bool(_backend.C_LOADED), "torch": torch.__version__,
            "fastar": __version__, "constriction": cons, "cpu": isa}


def _env_hash(env: dict) -> bytes:
    return hashlib.sha256(repr(sorted(env.items())).encode()).digest()


def _describe(env: dict) -> str:
    return (f"{env['dtype']} on {env['device']}, backend {env['backend']}"
            f"{'' if env['extension'] else ' (no compiled extension)'}, torch {env['torch']}, fastar "
            f"{env['fastar']}, constriction {env['constriction']}, CPU {env['cpu']}")


# ------------------------------------------------------------------------------------- the model side

def _params_device(model):
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError(f"fastar codec: {type(model).__name__} has no parameters")
    return p.device, p.dtype


def _nearest(sorted_vals: torch.Tensor, flat: torch.Tensor, exact: bool) -> torch.Tensor:
    """Indices of flat's values in the increasing sorted_vals (the nearest, as a continuous head's bin centres
    may differ from the data's by a rounding; with ``exact`` every value must be there)."""
    k = sorted_vals.shape[0]
    idx = torch.searchsorted(sorted_vals, flat).clamp_(0, k - 1)
    lo = (idx - 1).clamp(min=0)
    near = torch.where((sorted_vals[lo] - flat).abs() <= (sorted_vals[idx] - flat).abs(), lo, idx)
    if exact and not bool((sorted_vals[near] == flat).all()):
        raise ValueError("fastar codec: x holds values outside the model's support")
    return near


def _has_value_conditionals(head) -> bool:
    from fastar.nn.heads import Head

    return type(head).value_log_probs is not Head.value_log_probs


class _Support:
    """A head's step as symbols. Joint: one symbol a step over ``support()`` (value rows <-> symbol
    indices). Sequential (a head that draws V > 1 values jointly and gives their chain-rule factors,
    ``value_log_probs``): V symbols a step, value j over ``value_support(j)``."""

    def __init__(self, head, acc):
        name = type(head).__name__
        vdt = head.value_dtype(acc)
        fdt = vdt if vdt.is_floating_point else torch.float64     # float values: bin centres with the sampler's bits
        self.head, self.vdt = head, vdt
        self.sequential = head.values > 1 and _has_value_conditionals(head)
        if self.sequential:
            self.columns = []
            for j in range(head.values):
                col = head.value_support(j, fdt)
                if col.dim() != 1 or not 2 <= col.shape[0] <= MAX_SUPPORT or not bool((col[1:] > col[:-1]).all()):
                    raise ValueError(f"fastar codec: {name}.value_support({j}) must be an increasing (L,) tensor of "
                                     f"2 to {MAX_SUPPORT} values, got shape {list(col.shape)}")
                self.columns.append(col.to(vdt))
            self.sizes = [c.shape[0] for c in self.columns]
            self.k = sum(self.sizes)                          # distribution entries a step (the memory budget)
            return
        try:
            sup = head.support(fdt)
        except NotImplementedError:
            raise ValueError(f"fastar codec: the model's head ({name}) is continuous (no finite support): it has no "
                             "discrete probabilities to code with") from None
        if sup.dim() != 2 or sup.shape[1] != head.values:
            raise ValueError(f"fastar codec: {name}.support() must be (K, {head.values}), got {list(sup.shape)}")
        self.k = sup.shape[0]
        if self.k > MAX_SUPPORT:
            raise ValueError(
                f"fastar codec: one step of {name} takes {self.k} joint values (its {head.values} values are drawn "
                f"jointly), more than the coder's {MAX_SUPPORT} per symbol, and the head gives no per-value "
                "conditionals (value_log_probs) to code them one at a time")
        if self.k < 2:
            raise ValueError(f"fastar codec: {name}'s support has {self.k} value(s); nothing to code")
        self.values = sup.to(self.vdt)                      # (K, V)
        self.sorted = head.values == 1 and bool((self.values[1:, 0] > self.values[:-1, 0]).all())
        self.codes = self.sorted and self.vdt == torch.int64 and torch.equal(self.values[:, 0], torch.arange(self.k))

    def index(self, v: torch.Tensor) -> torch.Tensor:
        """(N, T, V) values -> symbols: (N, T) int64 (joint), (N, T, V) (sequential); ValueError for a value
        outside the support."""
        exact = self.head.discrete
        if self.sequential:
            return torch.stack([_nearest(c.to(v.device), v[..., j].contiguous(), exact)
                                for j, c in enumerate(self.columns)], -1)
        sup = self.values.to(v.device)
        if self.sorted:
            return _nearest(sup[:, 0].contiguous(), v[..., 0].contiguous(), exact)
        n, t, V = v.shape
        out = torch.empty(n * t, dtype=torch.int64, device=v.device)
        flat = v.reshape(-1, V)
        for a in range(0, flat.shape[0], 4096):
            eq = (flat[a:a + 4096, None, :] == sup[None]).all(2)
            if not bool(eq.any(1).all()):
                raise ValueError("fastar codec: x holds values outside the model's support")
            out[a:a + 4096] = eq.to(torch.int8).argmax(1)
        return out.view(n, t)


def _freqs(lp: torch.Tensor) -> np.ndarray:
    """(N, K) log-probabilities of a step's values -> (N, K) integer frequencies (float64 holding integers)
    out of 2**PRECISION, every one >= 1. The same tensor in gives the same bits out (the CPU thread count
    is pinned around every caller, and numpy's float64 exp and sums run the same way on the same shape)."""
    lp = lp.detach().cpu()
    lp = (lp if lp.dtype in (torch.float32, torch.float64) else lp.double()).numpy().astype(np.float64, copy=False)
    top = lp.max(1, keepdims=True)                             # NaN anywhere in a row makes its max NaN
    if not np.isfinite(top).all():
        raise ValueError("fastar codec: the model gives non-finite probabilities at a step (NaN or no mass)")
    p = np.exp(lp - top)
    p /= p.sum(1, keepdims=True)
    return np.floor(p * float((1 << PRECISION) - lp.shape[1])) + 1.0


def _slice_cond(cond, n, a, b):
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[a:b] if cond.dim() >= 1 and cond.shape[0] == n else cond
    if isinstance(cond, (tuple, list)):
        return type(cond)(_slice_cond(c, n, a, b) for c in cond)
    return cond


def _is_labels(cond, n) -> bool:
    return (isinstance(cond, torch.Tensor) and cond.dtype == torch.int64 and cond.dim() == 1 and cond.shape[0] == n
            and bool((cond >= 0).all()))


def _chunks(n, chunk):
    return [(a, min(n, a + chunk)) for a in range(0, n, chunk)]


def best_labels(model, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """For a class-conditional model (``model.num_classes``): each example's most likely class label,
    argmin_c nll(x | c), (N,) int64. A valid choice of conditioning for the codec (any label decodes,
    since the file stores it), and usually the cheapest."""
    k = getattr(model, "num_classes", None)
    if not k:
        raise ValueError(f"{type(model).__name__} is not class-conditional (no num_classes); there are no labels "
                         "to choose")
    return _class_nll(model, x, k, batch).argmin(1)


def _class_nll(model, x, k, batch=256):
    dev, _ = _params_device(model)

    def work():
        out = []
        for a in range(0, x.shape[0], batch):
            xb = x[a:a + batch].to(dev)
            out.append(torch.stack([model.nll(xb, torch.full((xb.shape[0],), c, dtype=torch.int64, device=dev))
                                    for c in range(k)], 1).double().cpu())
        return torch.cat(out)

    return _coded(model, work)


def score(model, x: torch.Tensor, cond=None, batch: int = 256) -> torch.Tensor:
    """Bits per dimension of each example, (N,) float64: the model's exact NLL in bits over the
    values an example holds (the teacher-forced forward pass, on one pinned CPU thread, so a score
    does not depend on the thread count). A class-conditional model given no labels scores the uniform mixture
    over its classes, -log2(mean_c p(x | c)) / D."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"score: x must be a batch (N, ...) tensor, got "
                         f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    D = math.prod(x.shape[1:])
    k = getattr(model, "num_classes", None)
    if cond is None and k:
        nll = _class_nll(model, x, k, batch)                                     # (N, K) nats
        mix = -(torch.logsumexp(-nll, 1) - math.log(k))
        return mix / (D * math.log(2.0))
    dev, _ = _params_device(model)

    def work():
        return torch.cat([model.nll(x[a:a + batch].to(dev), _slice_cond(cond, x.shape[0], a, a + batch)).double().cpu()
                          for a in range(0, x.shape[0], batch)])

    return _coded(model, work) / (D * math.log(2.0))


def nll_bits(model, x: torch.Tensor, cond=None) -> float:
    """What :func:`encode` should cost, in bits: the model's NLL of x given cond (the teacher-forced
    forward pass) plus the bits of the class labels it stores in the stream (:func:`label_bits`)."""
    bits = float(score(model, x, cond).sum()) * math.prod(x.shape[1:])
    if _is_labels(cond, x.shape[0]):
        bits += label_bits(cond)
    return bits


def _label_symbols(labels: np.ndarray, hi: int) -> tuple[bool, list[tuple[int, int]]]:
    """The labels as the stream codes them: (in runs?, [(symbol, alphabet size), ...] in decoding
    order), the cheaper of one uniform symbol per label and the run coding (module docstring)."""
    n = len(labels)
    if hi == 0 or n == 1:
        return False, []
    cut = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    starts = np.concatenate([[0], cut])
    lengths = np.diff(np.concatenate([starts, [n]]))
    vals = labels[starts]
    runs = [(len(starts) - 1, n), (int(vals[0]), hi + 1)]
    left = n
    for r in range(len(starts)):
        if r:
            prev, v = int(vals[r - 1]), int(vals[r])
            runs.append((v if v < prev else v - 1, hi))
        if r < len(starts) - 1:                   # the last run's length is what is left
            later = len(starts) - 1 - r
            runs.append((int(lengths[r]) - 1, left - later))
            left -= int(lengths[r])
    cost = sum(math.log2(size) for _, size in runs)
    if cost < n * math.log2(hi + 1):
        return True, runs
    return False, [(int(v), hi + 1) for v in labels]


def label_bits(labels: torch.Tensor) -> float:
    """The stream bits :func:`encode` spends on class labels (N,) int64: the cheaper of log2(max + 1)
    bits each and their runs (none for one example or all zeros: the header's maximum says it)."""
    a = labels.detach().cpu().numpy().astype(np.int64)
    return sum(math.log2(size) for _, size in _label_symbols(a, int(a.max()))[1])


# -------------------------------------------------------------------------------------- the coder

def _ans(words=None):
    import constriction

    return constriction.stream.stack.AnsCoder() if words is None else constriction.stream.stack.AnsCoder(words)


def _family():
    import constriction

    return constriction.stream.model.Categorical(perfect=False)


def _uniform(size):
    import constriction

    return constriction.stream.model.Uniform(int(size))


def _coded(model, fn):
    """Run fn() with the model in eval mode, on one pinned CPU thread, without autograd."""
    from fastar.threads import pinned

    was = model.training
    model.eval()
    try:
        with torch.no_grad(), pinned(1):
            return fn()
    finally:
        model.train(was)


def _encode_chunk(model, x, cond, shape, coder, progress, desc):
    from fastar import sampling

    g = torch.Generator().manual_seed(0)         # prepare draws uniforms the coder never reads
    n = x.shape[0]
    run = sampling.prepare(model, n, shape, cond, g, prefix=x, mask=torch.ones((), dtype=torch.bool))
    seq = run.seq
    sup = _Support(seq.head, run.acc)
    steps = run.given_values[:, run.slot_table.flatten()].view(n, seq.steps, -1)          # (N, T, V)
    idx = sup.index(steps)                                                             # (N, T[, V])
    # the run the decoder will have: no given values (they would choose another cache for some models)
    run.given_values = run.given_mask = None
    run.values.zero_()
    head = seq.head
    if sup.sequential:
        cols = [c.to(run.device) for c in sup.columns]
        same = len(set(sup.sizes)) == 1
        freqs = np.empty((seq.steps, len(cols), n, sup.sizes[0]), dtype=np.float64) if same else \
            [np.empty((seq.steps, n, L), dtype=np.float64) for L in sup.sizes]

        def supply(t, params):
            v = torch.stack([c.index_select(0, idx[:, t, j]) for j, c in enumerate(cols)], 1)   # (N, V)
            for j in range(len(cols)):
                f = _freqs(head.value_log_probs(params, j, v[:, :j]))
                if same:
                    freqs[t, j] = f
                else:
                    freqs[j][t] = f
            return v
    else:
        sup_vals = sup.values.to(run.device)
        freqs = np.empty((seq.steps, n, sup.k), dtype=np.float64)

        def supply(t, params):
            freqs[t] = _freqs(head.support_log_probs(params))
            return sup_vals.index_select(0, idx[:, t])

    back = sampling.drive(model, run, supply, progress=progress, fused=None, desc=desc)
    if not torch.equal(back.to(x.device).to(x.dtype), x):
        raise ValueError("fastar codec: x is not exactly representable by the model's values (its values map to "
                         "other bins and would not decode to the same x)")
    fam = _family()
    if not sup.sequential:
        syms = idx.t().contiguous().view(-1).cpu().numpy().astype(np.int32)               # step-major
        coder.encode_reverse(syms, fam, freqs.reshape(-1, sup.k))
        return
    syms = idx.permute(1, 2, 0).contiguous().cpu().numpy().astype(np.int32)           # (T, V, N): decode order
    if same:
        coder.encode_reverse(syms.reshape(-1), fam, freqs.reshape(-1, sup.sizes[0]))
        return
    for t in reversed(range(seq.steps)):                      # a stack: the last symbol goes in first
        for j in reversed(range(len(sup.sizes))):
            coder.encode_reverse(syms[t, j], fam, freqs[j][t])


def encode(model, x: torch.Tensor, cond=None, *, chunk: int | None = None, progress: bool = False) -> bytes:
    """Compress x (N, *shape), in the layout ``model.sample`` returns, losslessly with the model's
    conditionals. cond: the model's conditioning (stored in the file), or ``"best"`` for a
    class-conditional model: each example's most likely label (:func:`best_labels`). chunk: how
    many examples go through the step loop together (None: as many as fit a fixed memory budget;
    it is stored, and the decoder uses the same batches). Returns the file's bytes."""
    name = type(model).__name__
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"encode: x must be a (N, ...) tensor of N >= 1 examples, got "
                         f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("encode: x must be finite")
    n = x.shape[0]
    if isinstance(cond, str):
        if cond != "best":
            raise ValueError(f"encode: cond must be the model's conditioning, None or 'best', got {cond!r}")
        cond = best_labels(model, x)
    dev, _ = _params_device(model)
    x = x.to(dev)
    shape = tuple(x.shape[1:])
    # the head and support size (and every argument check of the model) from a one-example sequence
    seq = model.sequence(1, shape, _slice_cond(cond, n, 0, 1))
    k = _Support(seq.head, torch.float64).k
    if tuple(seq.shape) != shape:
        raise ValueError(f"encode: {name} codes examples of shape {list(seq.shape)} for x's {list(shape)}")
    if chunk is None:
        chunk = max(1, min(n, CHUNK_BUDGET // max(1, seq.steps * k)))
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"encode: chunk must be a positive int, got {chunk!r}")
    chunk = min(chunk, n)
    labels = _is_labels(cond, n)
    env = _environment(model)
    mhash, ehash = _model_hash(model), _env_hash(env)

    head = bytearray([MAGIC | FORMAT_VERSION, ((mhash[0] & 0xF) << 4) | (ehash[0] & 0xF)])
    kind = _COND_NONE if cond is None else _COND_LABELS if labels else _COND_RAW
    if len(shape) > 7:
        raise ValueError(f"encode: examples of at most 7 dimensions, got shape {list(shape)}")
    in_runs, label_syms = _label_symbols(cond.cpu().numpy().astype(np.int64), int(cond.max())) \
        if kind == _COND_LABELS else (False, [])
    head.append(kind | (4 if chunk == n else 0) | (len(shape) << 3) | (0x40 if in_runs else 0))
    head += _varint(n)
    if chunk != n:
        head += _varint(chunk)
    head += b"".join(_varint(s) for s in shape)
    if kind == _COND_LABELS:
        hi = int(cond.max())
        head += _varint(hi)
    elif kind == _COND_RAW:
        head += _put_cond(cond)

    def work():
        coder = _ans()
        parts = _chunks(n, chunk)
        for i, (a, b) in reversed(list(enumerate(parts))):       # a stack: the last chunk goes in first
            _encode_chunk(model, x[a:b], _slice_cond(cond, n, a, b), shape, coder, progress,
                          f"encoding {i + 1}/{len(parts)}" if len(parts) > 1 else "encoding")
        if label_syms and not in_runs:                       # one uniform symbol per label
            coder.encode_reverse(np.asarray([v for v, _ in label_syms], dtype=np.int32), _uniform(hi + 1))
        for v, size in reversed(label_syms if in_runs else []):
            if size > 1:
                coder.encode_reverse(np.asarray([v], dtype=np.int32), _uniform(size))
        return coder.get_compressed()

    words = _coded(model, work)
    payload = np.asarray(words, dtype="<u4").tobytes()
    trim = 0
    while trim < 3 and payload and payload[-1 - trim] == 0:
        trim += 1
    payload = payload[:len(payload) - trim]
    body = bytes(head) + payload
    crc = zlib.crc32(body, zlib.crc32(mhash + ehash))
    return body + struct.pack("<I", crc)


def header(data: bytes) -> dict:
    """The header fields of a codec file (no model needed): format, n, chunk, shape, cond kind,
    header and payload sizes. ValueError for a foreign or truncated file."""
    return _parse(data)[0]


def _parse(data):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"decode: data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 8:
        raise ValueError(f"fastar codec: the file is truncated or not a fastar codec file ({len(data)} bytes)")
    if data[0] & 0xF0 != MAGIC:
        raise ValueError("fastar codec: not a fastar codec file (wrong magic byte)")
    version = data[0] & 0x0F
    if version != FORMAT_VERSION:
        raise ValueError(f"fastar codec: the file has format version {version}; this fastar reads version "
                         f"{FORMAT_VERSION}")
    r = _Reader(data, len(data) - 4)
    r.pos = 1
    hashes = r.byte()
    flags = r.byte()
    kind = flags & 3
    if kind == 3 or flags & 0x80 or (flags & 0x40 and kind != _COND_LABELS):
        raise ValueError("fastar codec: the header's flags are malformed (corrupt file?)")
    n = r.varint()
    chunk = n if flags & 4 else r.varint()
    ndim = (flags >> 3) & 7
    shape = tuple(r.varint() for _ in range(ndim))
    hi, cond = None, None
    if kind == _COND_LABELS:
        hi = r.varint()
    elif kind == _COND_RAW:
        cond = _get_cond(r)
    if n < 1 or chunk < 1 or chunk > n or any(s < 1 for s in shape):
        raise ValueError("fastar codec: the header's sizes are malformed (corrupt file?)")
    info = dict(format=version, n=n, chunk=chunk, shape=shape, cond={0: None, 1: "labels", 2: "stored"}[kind],
                header_bytes=r.pos + 4, payload_bytes=len(data) - 4 - r.pos, bytes=len(data))
    return info, dict(hashes=hashes, kind=kind, hi=hi, cond=cond, start=r.pos, data=data, runs=bool(flags & 0x40))


def check(model, data: bytes):
    """ValueError unless ``data`` is a whole codec file written with this model in this environment
    (the header's hashes and the checksum); the decoder's first step, also for finding the model of
    a file. Returns the parsed header."""
    info, p = _parse(data)
    data = p["data"]
    env = _environment(model)
    mhash, ehash = _model_hash(model), _env_hash(env)
    if p["hashes"] >> 4 != mhash[0] & 0xF:
        raise ValueError(f"fastar codec: the file was written with another model (weights or configuration) than "
                         f"this {type(model).__name__}")
    if p["hashes"] & 0xF != ehash[0] & 0xF:
        raise ValueError("fastar codec: the file was written under another dtype, device, backend or build than "
                         f"this decoder's ({_describe(env)}); decode it where it was encoded")
    body = data[:-4]
    if zlib.crc32(body, zlib.crc32(mhash + ehash)) != struct.unpack("<I", data[-4:])[0]:
        raise ValueError("fastar codec: checksum mismatch: the file is corrupt or truncated (or was written with "
                         "another model or environment)")
    return info, p


def decode(model, data: bytes, *, with_cond: bool = False, progress: bool = False):
    """The x that :func:`encode` compressed, exactly (on the model's device, in the layout ``sample``
    returns); with ``with_cond``, ``(x, cond)``. ValueError for a truncated, corrupt or foreign
    file, for a file written with another model, and for one written under another dtype, device,
    backend or build (see the module docstring)."""
    info, p = check(model, data)
    body = p["data"][:-4]
    payload = body[p["start"]:]
    payload += b"\0" * (-len(payload) % 4)
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    n, chunk, shape = info["n"], info["chunk"], info["shape"]
    from fastar import sampling

    def work():
        try:
            coder = _ans(words)
        except Exception as e:
            raise ValueError(f"fastar codec: the payload is not an ANS stream ({e})") from None
        cond = p["cond"]
        if p["kind"] == _COND_LABELS:
            cond = _decode_labels(coder, n, p["hi"], p["runs"])
        dev, _ = _params_device(model)
        cond_dev = _to(cond, dev)
        outs = []
        parts = _chunks(n, chunk)
        for i, (a, b) in enumerate(parts):
            g = torch.Generator().manual_seed(0)
            run = sampling.prepare(model, b - a, shape, _slice_cond(cond_dev, n, a, b), g)
            seq = run.seq
            supply = _decoder_supply(_Support(seq.head, run.acc), coder, b - a, run.device)

            try:
                outs.append(sampling.drive(model, run, supply, progress=progress, fused=None,
                                           desc=f"decoding {i + 1}/{len(parts)}" if len(parts) > 1 else "decoding"))
            except ValueError:
                raise
            except Exception as e:      # constriction's errors on an exhausted or inconsistent stream
                raise ValueError(f"fastar codec: decoding failed ({type(e).__name__}: {e}); the file does not match "
                                 "this model and environment") from None
        if not coder.is_empty():
            raise ValueError("fastar codec: decoding did not end where encoding began: this decoder's probabilities "
                             "differ from the encoder's (another machine, build, dtype or device?)")
        return torch.cat(outs), cond

    x, cond = _coded(model, work)
    return (x, cond) if with_cond else x


def _decode_labels(coder, n, hi, runs):
    """The labels :func:`encode` pushed last (see _label_symbols), (n,) int64."""
    if hi == 0 or n == 1:
        if runs:
            raise ValueError("fastar codec: the header's flags are malformed (corrupt file?)")
        return torch.full((n,), hi, dtype=torch.int64)
    if not runs:
        return torch.from_numpy(np.asarray(coder.decode(_uniform(hi + 1), n), dtype=np.int64))

    def get(size):
        return int(np.asarray(coder.decode(_uniform(size), 1))[0]) if size > 1 else 0

    count = get(n) + 1
    out, left, prev = [], n, None
    for r in range(count):
        v = get(hi + 1) if r == 0 else get(hi)
        if r:
            v = v if v < prev else v + 1
        later = count - 1 - r
        length = get(left - later) + 1 if later else left
        if not 1 <= length <= left or v > hi:
            raise ValueError("fastar codec: the stored labels are malformed (corrupt file?)")
        out += [v] * length
        left -= length
        prev = v
    return torch.tensor(out, dtype=torch.int64)


def _decoder_supply(sup, coder, n, device):
    """The decoder's supply(t, params): each step's values decoded from the ANS stack, in the order the
    encoder pushed them (joint: one symbol a step; sequential: value 0, then 1 given 0, ...)."""
    head, fam = sup.head, _family()

    def symbols(lp):
        s = torch.from_numpy(np.asarray(coder.decode(fam, _freqs(lp)), dtype=np.int64))
        return s if device.type == "cpu" else s.to(device)

    if not sup.sequential:
        if sup.codes:                                   # the support is the codes 0..K-1 themselves
            return lambda t, params: symbols(head.support_log_probs(params)).unsqueeze(1)
        sup_vals = sup.values.to(device)
        return lambda t, params: sup_vals.index_select(0, symbols(head.support_log_probs(params)))
    cols = [c.to(device) for c in sup.columns]

    def supply(t, params):
        v = torch.empty(n, len(cols), dtype=sup.vdt, device=device)
        for j, c in enumerate(cols):
            v[:, j] = c.index_select(0, symbols(head.value_log_probs(params, j, v[:, :j])))
        return v
    return supply


def _to(cond, dev):
    if isinstance(cond, torch.Tensor):
        return cond.to(dev)
    if isinstance(cond, (tuple, list)):
        return type(cond)(_to(c, dev) for c in cond)
    return cond
