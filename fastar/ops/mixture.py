"""Output distributions: the discretized logistic mixture (loss and sampler) and categorical sampling.

Discretized logistic mixture (PixelCNN++; the openai/pixel-cnn parameter layout)
--------------------------------------------------------------------------------
``discretized_mix_logistic_nll(x, params, num_mixtures, num_bits=8, reduction="sum")``

* images: x (B, C, H, W), C = 1 or 3, values in [-1, 1] (bin centres ``-1 + 2 i / (2**num_bits - 1)``);
  params (B, P, H, W) with P = 3K (C = 1) or 10K (C = 3).
* audio (the WaveNet mixture head): x (B, T) and params (B, 3K, T).

Channel layout of params (K = num_mixtures): ``params[:, :K]`` are the mixture logits; then for each
colour c (R, G, B) a block of 3K channels (2K for C = 1) starting at ``K + c * 3K``: K means, K
log-scales and, for 3 channels, K raw coefficients. ``tanh`` of the raw coefficients of the R, G and B
blocks gives the G <- R, B <- R and B <- G weights of the linear dependence of the means on the
sub-pixels already known (``mean_G += c0 * x_R``, ``mean_B += c1 * x_R + c2 * x_G``). This is exactly
the layout of openai/pixel-cnn's ``discretized_mix_logistic_loss`` after its NHWC -> NCHW move, so
``params`` from a PyTorch port can be passed unchanged.

Numerics are the paper code's: log-scales clamped below at -7, bin half-width
``1 / (2**num_bits - 1)``, x below -0.999 (above 0.999) integrates the logistic from -inf (to +inf),
and where the bin mass is under 1e-5 the log density at the bin centre minus
``log((2**num_bits - 1) / 2)`` is used. Result in nats: "none" gives the NLL per image/clip,
shape (B,); "sum" their total; "mean" their mean over the batch. The kernel computes one pass
over params forward and one backward, never materialising the (B, C, H, W, K) intermediates the
reference keeps for autograd. Differentiable in params and x.

Non-finite parameters (kernels and reference, every dtype): a logit of -inf switches its component
off (exactly: the NLL is that of the other components, its gradients are 0); a logit of +inf or NaN,
or every logit -inf, is no distribution: NaN. A mean of +-inf or NaN: NaN (no limit is taken).
Log-scales below -7, -inf included, clamp to -7 (the paper's rule); a log-scale of +inf is the limit
of an ever wider logistic (half the mass in each edge bin, none in between, so the NLL may be +inf);
NaN stays NaN. NaN anywhere in a position's parameters or x gives that position a NaN NLL.

``sample_discretized_mix_logistic(params, num_mixtures, generator=None, noise=None, temperature=1.0,
num_bits=8)``: per pixel one mixture component is chosen by inverse CDF of
``softmax(logits / temperature)`` on one uniform (temperature 0: argmax); each colour draws a logistic
sample ``mean + temperature * exp(log_scale) * (log u - log(1 - u))`` with u clamped into
(1e-5, 1 - 1e-5), is clamped to [-1, 1] and rounded to the nearest bin centre
(``(2 i - bins) / bins`` with ``i = floor((x + 1) * bins / 2 + 0.5)``, bins = 2**num_bits - 1),
and that quantised value feeds the next colour's mean (R -> G -> B), so the draw follows the
discretized likelihood exactly. ``noise`` holds the
uniforms: (B, 1 + C, H, W) for images, (B, 2, T) for audio; channel 0 picks the component, channel
1 + c drives colour c. Returns (B, C, H, W) or (B, T).

Dtypes: CPU kernels float32/float64 (float32 runs vectorised tiles: AVX-512 or AVX2 chosen at load
time); CUDA kernels float32, float64, float16, bfloat16 params with float32 accumulation. Losses and
samples come back in float64 for float64 params, else float32. Given noise, kernel and reference
agree exactly in float64 and nearly always in float32 (a draw within rounding of a CDF or bin
boundary may differ). The loss's x range check ([-1, 1] up to 1e-3) runs on CPU outside
torch.compile only; on CUDA it would cost a host-device sync, so values beyond land in the edge bins.

Categorical sampling
--------------------
``categorical_sample(logits, dim=1, generator=None, noise=None, temperature=1.0, top_k=None)``
draws one index per position by inverse CDF on one uniform per position:
``index = min(#{k : c[k] <= u * c[-1]}, last k with e[k] > 0)`` where
``z = logits / temperature``, ``e = exp(z - max z)`` and ``c = cumsum(e)`` (the unnormalised
CDF of softmax(z)); this one rule, with its exp and its roundings, is csrc/common/categorical.h's,
shared by every kernel that draws. Temperature 0 means argmax.
``top_k`` keeps the k largest logits per position (ties at the k-th value kept).
``noise`` (the uniforms, shape = logits.shape without ``dim``, values in [0, 1)) makes
the draw deterministic, so a kernel and the reference draw the same sample; without
it the uniforms come from ``torch.rand(..., generator=generator)``.
Returns int64 indices of shape logits.shape without ``dim``.
NaN policy (every draw site: categorical_sample, the mixture component draw, wavenet_step,
gated_pixelcnn_step; kernels and reference): a NaN or +inf logit at a position draws index 0
(temperature 0: argmax, where NaN after index 0 is skipped). Noise must hold uniforms in [0, 1):
on CPU outside torch.compile every public op checks it and raises; on CUDA a check would cost
a host sync per call (and break CUDA-graph capture of a sampling step), so there a NaN uniform
draws the last category of positive weight and u >= 1 the same, u < 0 index 0, in kernels and
reference alike. Temperature must be a finite non-negative number.
The float32 CPU kernels (vectorised categorical_rows and the mixture tiles) normalise the CDF
once (a reciprocal) instead of comparing with u * total, so their float32 draws agree with the
reference "nearly always" (a draw within rounding of a boundary may differ); their NaN/+inf and
out-of-range-noise outcomes are the rule above.
The kernel computes the same thing in one pass per position (temperature and top_k included);
without ``noise`` the uniforms are drawn in Python exactly as the reference draws them, so kernel and
reference agree given a seed. CPU kernel float32/float64; CUDA kernel float32, float64, float16,
bfloat16 (float32 accumulation).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastar import _backend
from fastar.ops._common import (check_dim_arg, check_same_device, check_temperature, check_tensor, check_uniforms,
                                host_checkable, no_double_backward, reference_grads)

__all__ = ["categorical_sample", "categorical_sample_ref", "discretized_mix_logistic_nll",
           "discretized_mix_logistic_nll_ref", "sample_discretized_mix_logistic",
           "sample_discretized_mix_logistic_ref", "dml_value_log_probs", "dml_value_log_probs_ref"]

CATEGORICAL_KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}
DML_KERNEL_DTYPES = CATEGORICAL_KERNEL_DTYPES
VALUE_KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64)}     # dml_value_log_probs: a CPU kernel only

# The paper code's constants (openai/pixel-cnn nn.py).
LOG_SCALE_MIN = -7.0
EDGE = 0.999
MIN_BIN_MASS = 1e-5
U_EPS = 1e-5


def _check_categorical(op, logits, dim, noise, temperature, top_k):
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"{op}: logits must be a floating-point tensor, got "
                        f"{logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.dim() == 0:
        raise ValueError(f"{op}: logits must have at least 1 dimension (the categories), got a scalar")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{op}: dim must be an int, got {dim!r}")
    if not -logits.dim() <= dim < logits.dim():
        raise ValueError(f"{op}: dim {dim} is out of range for logits of shape {list(logits.shape)}")
    dim = dim % logits.dim()
    k = logits.shape[dim]
    if k < 1:
        raise ValueError(f"{op}: logits must have at least one category along dim {dim}, got shape "
                         f"{list(logits.shape)}")
    check_temperature(op, temperature)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= k):
        raise ValueError(f"{op}: top_k must be None or an int in [1, {k}], got {top_k!r}")
    out_shape = logits.shape[:dim] + logits.shape[dim + 1:]
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError(f"{op}: noise must be a floating-point tensor of uniforms in [0, 1)")
        if noise.shape != out_shape:
            raise ValueError(f"{op}: noise must have shape {list(out_shape)} (logits without dim {dim}), got "
                             f"{list(noise.shape)}")
        if noise.device != logits.device:
            raise ValueError(f"{op}: noise is on {noise.device} but logits on {logits.device}")
        check_uniforms(op, "noise", noise)
    return dim, out_shape


def _div(x, d):
    """``x / d`` for a Python number ``d``, one correctly rounded division on every device, as the
    kernels divide. Not ``x / d`` itself: on CUDA, torch divides a tensor by a CPU scalar as
    ``x * (1 / d)`` (ATen's div_true_kernel_cuda turns a CPU-scalar divisor into a reciprocal
    multiply), which differs from the division in the last bit: for the float32 bin centres
    ``(2 i - 255) / 255`` half of the time, for float64 one in sixteen. That made the CUDA
    sampler disagree with this reference (same bin, other bits) although the kernel was right.
    A 0-dim tensor on x's device is a true divisor on CPU and CUDA alike (``torch.full`` is a fill
    kernel, no host-to-device copy, so this stays capturable in a CUDA graph)."""
    return x / torch.full((), d, dtype=x.dtype, device=x.device)


def _uniforms(logits, out_shape, generator):
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.rand(out_shape, generator=generator, device=logits.device, dtype=dtype)


def _exp_rn(x):
    """exp(x) for x <= 0 as csrc/common/categorical.h's exp_rn computes it (Cephes' rational
    approximation after a Cody-Waite reduction, each operation rounded once in float64), so
    the reference and the kernels weigh every category with the same bits; 0 below -708, NaN
    stays NaN. float32 input: computed in float64, rounded once."""
    out_dtype = x.dtype
    x = x.double()
    n = torch.floor(x * 1.4426950408889634073599 + 0.5)
    r = x - n * 6.93145751953125e-1
    r = r - n * 1.42860682030941723212e-6
    rr = r * r
    px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr + 9.99999999999999999910e-1)
    qx = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr + 2.27265548208155028766e-1) * rr \
        + 2.00000000000000000009e0
    e = 1.0 + 2.0 * (px / (qx - px))
    ok = x >= -708.0
    n_int = torch.where(ok, n, torch.zeros_like(n)).to(torch.int64)
    e = e * ((n_int + 1023) << 52).view(torch.float64)
    e = torch.where(ok, e, torch.where(torch.isnan(x), x, torch.zeros_like(x)))
    return e.to(out_dtype)


def categorical_sample_ref(logits, dim=1, generator=None, noise=None, temperature=1.0, top_k=None):
    """Reference: inverse-CDF categorical sampling (see the module docstring). Any device/dtype."""
    dim, out_shape = _check_categorical("categorical_sample_ref", logits, dim, noise, temperature, top_k)
    work = logits.movedim(dim, -1)
    work = work.double() if logits.dtype == torch.float64 else work.float()
    if top_k is not None:
        kth = work.topk(top_k, dim=-1).values[..., -1:]
        work = work.masked_fill(work < kth, float("-inf"))
    if temperature == 0:
        # The kernels' argmax_first (csrc/common/categorical.h): the first largest value, a NaN at
        # index 0 wins (nothing compares above it), a NaN elsewhere is skipped. torch.argmax would
        # pick the NaN.
        nan = torch.isnan(work)
        best = torch.where(nan, float("-inf"), work).argmax(-1)
        return torch.where(nan[..., 0], 0, best)
    if noise is None:
        noise = _uniforms(logits, out_shape, generator)
    # The kernels' one rule (csrc/common/categorical.h), op for op, so that float64 on CPU draws
    # the same index bit for bit: e = exp(z - max z), c = cumsum(e) (sequential on CPU), the
    # index is #{c_j <= u * c_last} capped at the last category with e > 0.
    z = _div(work, temperature)   # a true division, as the kernels' l_j / t (see _div)
    e = _exp_rn(z - z.amax(-1, keepdim=True))
    c = torch.cumsum(e, dim=-1)
    # #{c_j <= u c_last} written as K - #{c_j > u c_last}: the same count for any real u (c does not
    # decrease), and, like the kernels' "first j with c_j > u c_last, else the last positive", it falls
    # to the last positive category for a NaN u instead of to 0. No positive category (NaN or +inf
    # logits): index 0, as in the kernels.
    k = e.shape[-1]
    idx = k - (c > noise.to(c.dtype).unsqueeze(-1) * c[..., -1:]).sum(-1)
    positive = e > 0
    last_positive = torch.where(positive.any(-1), k - 1 - positive.flip(-1).to(torch.int64).argmax(-1), 0)
    return torch.minimum(idx, last_positive)


def categorical_sample(logits, dim=1, generator=None, noise=None, temperature=1.0, top_k=None):
    """Draw int64 indices from softmax(logits / temperature) along `dim` (see the module docstring).

    logits: any shape with the K categories along `dim`; noise: None or uniforms in [0, 1) of shape
    logits.shape without `dim`; temperature >= 0 (0: argmax); top_k: None or int in [1, K]. Returns
    int64 of shape logits.shape without `dim`. PyTorch equivalent (in distribution):
    ``torch.multinomial(torch.softmax(logits.movedim(dim, -1).flatten(0, -2) / temperature, -1), 1)``.
    Runs the compiled kernel or the reference according to :func:`fastar.set_backend`.
    """
    dim, out_shape = _check_categorical("categorical_sample", logits, dim, noise, temperature, top_k)
    if not _backend.use_kernel("categorical_sample", logits.device, logits.dtype, CATEGORICAL_KERNEL_DTYPES):
        return categorical_sample_ref(logits, dim, generator, noise, temperature, top_k)
    acc = _acc_dtype(logits.dtype)
    if temperature == 0:
        noise = None
    elif noise is None:
        noise = _uniforms(logits, out_shape, generator)
    k = logits.shape[dim]
    outer = math.prod(logits.shape[:dim])
    inner = math.prod(logits.shape[dim + 1:])
    l3 = logits.detach().reshape(outer, k, inner)
    u = None if noise is None else noise.reshape(outer, inner).to(acc)
    out = torch.ops.fastar.categorical_sample(l3, u, float(temperature), int(top_k or 0))
    return out.reshape(out_shape)


# ---------------------------------------------------------------------------------------------
# Discretized logistic mixture
# ---------------------------------------------------------------------------------------------

def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_int(op, name, v, lo, hi=None):
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{op}: {name} must be an int {rng}, got {v!r}")


def _channels_from_params(op, p, k, audio):
    """Colour count C implied by P = params.shape[1] and K (3K -> 1, 10K -> 3)."""
    if p == 3 * k:
        return 1
    if p == 10 * k and not audio:
        return 3
    want = f"3K = {3 * k}" if audio else f"3K = {3 * k} (1 channel) or 10K = {10 * k} (3 channels)"
    raise ValueError(f"{op}: params has {p} channels, but num_mixtures={k} needs {want}")


def _check_dml_params(op, params, num_mixtures, num_bits):
    check_tensor(op, "params", params)
    _check_int(op, "num_mixtures", num_mixtures, 1)
    _check_int(op, "num_bits", num_bits, 1, 16)
    if params.dim() == 4:
        audio = False
    elif params.dim() == 3:
        audio = True
    else:
        raise ValueError(f"{op}: params must be 4-D (B, P, H, W) for images or 3-D (B, 3K, T) for audio, got "
                         f"shape {list(params.shape)}")
    c = _channels_from_params(op, params.shape[1], num_mixtures, audio)
    return c, audio


def _check_dml_nll(op, x, params, num_mixtures, num_bits, reduction):
    check_tensor(op, "x", x)
    c, audio = _check_dml_params(op, params, num_mixtures, num_bits)
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"{op}: reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    if audio:
        if x.dim() != 2:
            raise ValueError(f"{op}: with 3-D params (B, 3K, T) x must be 2-D (B, T), got shape {list(x.shape)}")
        if x.shape[0] != params.shape[0] or x.shape[1] != params.shape[2]:
            raise ValueError(f"{op}: x of shape {list(x.shape)} does not match params of shape "
                             f"{list(params.shape)}; expected x of shape [{params.shape[0]}, {params.shape[2]}]")
    else:
        if x.dim() != 4:
            raise ValueError(f"{op}: with 4-D params (B, P, H, W) x must be 4-D (B, C, H, W), got shape "
                             f"{list(x.shape)}")
        if x.shape[1] != c:
            raise ValueError(f"{op}: params with {params.shape[1]} channels and num_mixtures={num_mixtures} "
                             f"describe {c}-channel images, but x has {x.shape[1]} channels")
        if x.shape[0] != params.shape[0] or x.shape[2:] != params.shape[2:]:
            raise ValueError(f"{op}: x of shape {list(x.shape)} does not match params of shape "
                             f"{list(params.shape)} (batch and H, W must agree)")
    check_same_device(op, x=x, params=params)
    # A data-dependent check: skipped under torch.compile (no graph break) and on CUDA (it would
    # cost a host-device sync per call); there values beyond +-1 simply land in the edge bins.
    if x.device.type != "cuda" and not torch.compiler.is_compiling() and x.numel():
        lo, hi = torch.aminmax(x.detach())
        if float(lo) < -1.0 - 1e-3 or float(hi) > 1.0 + 1e-3:
            raise ValueError(f"{op}: x must be scaled to [-1, 1], got values in [{float(lo):.4g}, {float(hi):.4g}]")
    b = params.shape[0]
    n = math.prod(params.shape[2:])
    return c, x.reshape(b, c, n), params.reshape(b, params.shape[1], n)


def _reduce(pix, reduction):
    per_item = pix.sum(1)
    if reduction == "none":
        return per_item
    if reduction == "sum":
        return per_item.sum()
    return per_item.mean()


def _dml_split_ref(p, k, c):
    """params (B, P, N) -> logits (B, K, N), means, log_scales (clamped) and tanh coeffs (B, C, K, N)."""
    b, _, n = p.shape
    logits = p[:, :k]
    rest = p[:, k:].reshape(b, c, 3 if c == 3 else 2, k, n)
    means = rest[:, :, 0]
    log_scales = rest[:, :, 1].clamp(min=LOG_SCALE_MIN)
    coeffs = torch.tanh(rest[:, :, 2]) if c == 3 else None
    return logits, means, log_scales, coeffs


def _dml_bin_log_probs(x, means, log_scales, bins):
    """log P(the bin centred at x) under logistics (means, exp(log_scales)) cut into ``bins + 1`` bins over
    [-1, 1], broadcasting: openai/pixel-cnn's rule (the two edge bins open to -inf / +inf, a bin of mass
    below MIN_BIN_MASS by its density at the centre). A non-finite mean gives NaN in every bin: it is no
    distribution (the edge formulas alone would take the limit for one sign and give inf - inf for the
    other). The kernels apply the same rules."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / bins)
    min_in = inv_stdv * (centered - 1.0 / bins)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)                            # left edge bin, open to -inf
    log_one_minus_cdf_min = -F.softplus(min_in)                             # right edge bin, open to +inf
    mid_in = inv_stdv * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    log_probs = torch.where(
        x < -EDGE, log_cdf_plus,
        torch.where(x > EDGE, log_one_minus_cdf_min,
                    torch.where(cdf_delta > MIN_BIN_MASS, torch.log(cdf_delta.clamp(min=1e-12)),
                                log_pdf_mid - math.log(bins / 2))))
    return torch.where(torch.isfinite(means), log_probs, torch.full_like(log_probs, float("nan")))


def _dml_nll_pixels_ref(x3, p3, k, c, num_bits):
    """Per-position NLL (B, N) in nats; x3 (B, C, N), p3 (B, P, N). The openai/pixel-cnn loss, line by line."""
    acc = _acc_dtype(p3.dtype)
    x, p = x3.to(acc), p3.to(acc)
    bins = 2 ** num_bits - 1
    logits, means, log_scales, coeffs = _dml_split_ref(p, k, c)
    xk = x.unsqueeze(2)                                                     # (B, C, 1, N)
    if c == 3:
        m_g = means[:, 1] + coeffs[:, 0] * xk[:, 0]
        m_b = means[:, 2] + coeffs[:, 1] * xk[:, 0] + coeffs[:, 2] * xk[:, 1]
        means = torch.stack([means[:, 0], m_g, m_b], dim=1)
    log_probs = _dml_bin_log_probs(xk, means, log_scales, bins)            # (B, C, K, N)
    total = log_probs.sum(1) + torch.log_softmax(logits, dim=1)             # (B, K, N)
    return -torch.logsumexp(total, dim=1)


def _check_dml_value(op, params, prev, num_mixtures, j, num_bits):
    """The Python side's checks of dml_value_log_probs (csrc/mixture.h's check_dml_value is the kernel's);
    returns the channel count."""
    check_tensor(op, "params", params, dim=2, layout="(N, P)")
    if not params.is_floating_point():
        raise TypeError(f"{op}: params must be a floating-point tensor, got {params.dtype}")
    _check_int(op, "num_mixtures", num_mixtures, 1)
    _check_int(op, "num_bits", num_bits, 1, 16)
    P = params.shape[1]
    if P not in (3 * num_mixtures, 10 * num_mixtures):
        raise ValueError(f"{op}: params has {P} channels, but num_mixtures={num_mixtures} needs 3K = "
                         f"{3 * num_mixtures} (1 channel) or 10K = {10 * num_mixtures} (3 channels)")
    c = 1 if P == 3 * num_mixtures else 3
    if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < c:
        raise ValueError(f"{op}: j must be a colour index in [0, {c}), got {j!r}")
    check_tensor(op, "prev", prev)
    if prev.dim() != 2 or tuple(prev.shape) != (params.shape[0], j):
        raise ValueError(f"{op}: prev must have shape {[params.shape[0], j]} (the pixel's earlier colours), got "
                         f"{list(prev.shape)}")
    if prev.dtype != _acc_dtype(params.dtype):
        raise TypeError(f"{op}: prev must be {_acc_dtype(params.dtype)} for {params.dtype} params, got {prev.dtype}")
    check_same_device(op, params=params, prev=prev)
    return c


def dml_value_log_probs_ref(params, prev, num_mixtures, j, num_bits=8):
    """Reference of :func:`dml_value_log_probs` in plain PyTorch (any device and dtype): the same formula,
    bin masses from the logistic CDF at the bin edges, mixed in probability space."""
    op = "dml_value_log_probs_ref"
    c = _check_dml_value(op, params, prev, num_mixtures, j, num_bits)
    return _dml_value_ref(params, prev, num_mixtures, c, j, num_bits)


def _dml_value_ref(params, prev, k, c, j, num_bits):
    acc = _acc_dtype(params.dtype)
    p = params.to(acc).unsqueeze(2)                                         # (N, P, 1)
    prev = prev.to(acc)
    bins = 2 ** num_bits - 1
    logits, means, log_scales, coeffs = _dml_split_ref(p, k, c)
    means, log_scales, logits = means[..., 0], log_scales[..., 0], logits[..., 0]     # (N, C, K), (N, K)

    def mean(i):                                                            # (N, K): G's moves with R, B's with R, G
        if i == 0:
            return means[:, 0]
        if i == 1:
            return means[:, 1] + coeffs[:, 0, :, 0] * prev[:, :1]
        return means[:, 2] + coeffs[:, 1, :, 0] * prev[:, :1] + coeffs[:, 2, :, 0] * prev[:, 1:2]

    logw = torch.log_softmax(logits, 1)                                     # (N, K)
    for i in range(j):
        logw = logw + _dml_bin_log_probs(prev[:, i:i + 1], mean(i), log_scales[:, i], bins)
    m, ls = mean(j).unsqueeze(2), log_scales[:, j].unsqueeze(2)             # (N, K, 1)
    inv = torch.exp(-ls)
    idx = torch.arange(bins + 2, dtype=acc, device=p.device)
    z = inv * ((idx * 2.0 - bins - 1.0) / bins - m)                        # (N, K, L + 1): bin i spans edges i, i + 1
    cdf, ccdf = torch.sigmoid(z), torch.sigmoid(-z)
    # the CDF difference, of the complements in the right tail (no cancellation near 1)
    mass = torch.where(z[..., :-1] > 0, ccdf[..., :-1] - ccdf[..., 1:], cdf[..., 1:] - cdf[..., :-1])
    centres = (idx[:-1] * 2.0 - bins) / bins
    mid = inv * (centres - m)
    a = torch.exp(-mid.abs())
    pdf = inv * a / ((1.0 + a) * (1.0 + a)) / (bins / 2.0)                  # openai: the density at the centre
    mass = torch.where(mass > MIN_BIN_MASS, mass, pdf)
    mass = torch.where(centres < -EDGE, cdf[..., 1:], mass)                 # open to -inf: the CDF at the upper edge
    mass = torch.where(centres > EDGE, ccdf[..., :-1], mass)                # open to +inf: 1 - the CDF at the lower edge
    w = torch.softmax(logw, 1)                                              # the components' posterior
    out = torch.log(torch.bmm(w.unsqueeze(1), mass).squeeze(1))             # (N, L)
    bad = ~(torch.isfinite(m[..., 0]).all(1) & torch.isfinite(w).all(1))
    return torch.where(bad.unsqueeze(1), torch.full_like(out, float("nan")), out)


def dml_value_log_probs(params, prev, num_mixtures, j, num_bits=8):
    """One pixel's colour j given its earlier colours, for an entropy coder: (N, 2**num_bits)
    log-probabilities (nats) of every bin of channel j given ``prev`` (N, j), the values of channels
    0..j-1 (bin centres, in the acc dtype of params: float64 for float64 params, else float32), under
    per-pixel mixture parameters ``params`` (N, 3K or 10K) in the layout of
    :func:`discretized_mix_logistic_nll`; returns the acc dtype.

    The mixture weights are their posterior given the earlier colours (openai's per-bin rule for those),
    and colour j's bin masses come from the logistic CDF at the 2**num_bits + 1 bin edges (the left
    edge bin open to -inf, the right one to +inf, a bin of mass not above MIN_BIN_MASS by its density
    at the centre, openai's fallback), so ``sum_j`` of them at a pixel's colours is the joint
    log-probability the loss gives it up to rounding, and each conditional sums to one up to that
    fallback's leak. What codes R, then G given R, then B given both instead of 2**(3 num_bits) joint
    values. Rows are independent and each row's sums run in a fixed order: the compiled kernel gives
    the same bits on any thread count. No gradient (a coding distribution; the reference,
    :func:`dml_value_log_probs_ref`, is differentiable)."""
    op = "dml_value_log_probs"
    c = _check_dml_value(op, params, prev, num_mixtures, j, num_bits)
    if _backend.use_kernel(op, params.device, params.dtype, VALUE_KERNEL_DTYPES):
        return torch.ops.fastar.dml_value_log_probs(params.detach(), prev.detach(), num_mixtures, j, num_bits)
    return _dml_value_ref(params, prev, num_mixtures, c, j, num_bits)


def discretized_mix_logistic_nll_ref(x, params, num_mixtures, num_bits=8, reduction="sum"):
    """Reference: the PixelCNN++ loss in plain PyTorch (any device and dtype; see the module docstring)."""
    c, x3, p3 = _check_dml_nll("discretized_mix_logistic_nll_ref", x, params, num_mixtures, num_bits, reduction)
    return _reduce(_dml_nll_pixels_ref(x3, p3, num_mixtures, c, num_bits), reduction)


def discretized_mix_logistic_nll(x, params, num_mixtures, num_bits=8, reduction="sum"):
    """Negative log-likelihood (nats) of x under the discretized logistic mixture in params.

    x: (B, C, H, W) with C in {1, 3}, or (B, T) audio, values in [-1, 1]; params: (B, 3K or 10K, H, W),
    or (B, 3K, T); any strides. Returns (B,) for reduction="none", else a scalar; float64 for float64
    params, else float32. Differentiable in params and x. See the module docstring for the layout and
    constants; the PyTorch equivalent is :func:`discretized_mix_logistic_nll_ref` (openai/pixel-cnn's
    ``discretized_mix_logistic_loss``). Runs the compiled kernel or the reference according to
    :func:`fastar.set_backend`.
    """
    op = "discretized_mix_logistic_nll"
    c, x3, p3 = _check_dml_nll(op, x, params, num_mixtures, num_bits, reduction)
    if _backend.use_kernel(op, params.device, params.dtype, DML_KERNEL_DTYPES):
        pix = torch.ops.fastar.discretized_mix_logistic_nll(x3.to(_acc_dtype(params.dtype)), p3, num_mixtures,
                                                            num_bits)
    else:
        pix = _dml_nll_pixels_ref(x3, p3, num_mixtures, c, num_bits)
    return _reduce(pix, reduction)


def _check_dml_sample(op, params, num_mixtures, noise, temperature, num_bits):
    c, audio = _check_dml_params(op, params, num_mixtures, num_bits)
    check_temperature(op, temperature)
    b = params.shape[0]
    noise_shape = (b, 1 + c) + tuple(params.shape[2:])
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError(f"{op}: noise must be a floating-point tensor of uniforms in [0, 1)")
        if tuple(noise.shape) != noise_shape:
            raise ValueError(f"{op}: noise must have shape {list(noise_shape)} (one uniform for the component "
                             f"and one per colour at each position), got {list(noise.shape)}")
        check_same_device(op, params=params, noise=noise)
        check_uniforms(op, "noise", noise)
    n = math.prod(params.shape[2:])
    out_shape = (b, c) + tuple(params.shape[2:]) if not audio else (b, n)
    return c, noise_shape, out_shape, params.reshape(b, params.shape[1], n)


def _sample_noise(params, noise_shape, generator):
    return torch.rand(noise_shape, generator=generator, device=params.device, dtype=_acc_dtype(params.dtype))


def _quantize(x, bins):
    # (2 i - bins) / bins: one rounding of exact integers, so every backend lands on the same bits
    # (a true division on CUDA too: see _div).
    return _div(torch.floor((x + 1.0) * (bins / 2.0) + 0.5) * 2.0 - bins, bins)


def _dml_sample_ref(p3, u3, k, c, temperature, num_bits):
    """p3 (B, P, N), u3 (B, 1 + C, N) -> (B, C, N) samples at the bin centres."""
    acc = _acc_dtype(p3.dtype)
    p, u = p3.to(acc), u3.to(acc)
    bins = 2 ** num_bits - 1
    logits, means, log_scales, coeffs = _dml_split_ref(p, k, c)
    comp = categorical_sample_ref(logits, dim=1, noise=u[:, 0], temperature=temperature)   # (B, N)
    idx = comp.view(comp.shape[0], 1, 1, comp.shape[1]).expand(-1, c, 1, -1)
    mean = means.gather(2, idx).squeeze(2)                                                  # (B, C, N)
    scale = torch.exp(log_scales.gather(2, idx).squeeze(2)) * temperature
    v = u[:, 1:].clamp(U_EPS, 1.0 - U_EPS)
    y = mean + scale * (torch.log(v) - torch.log1p(-v))
    x0 = _quantize(y[:, 0].clamp(-1.0, 1.0), bins)
    if c == 1:
        return x0.unsqueeze(1)
    cf = coeffs.gather(2, idx).squeeze(2)
    x1 = _quantize((y[:, 1] + cf[:, 0] * x0).clamp(-1.0, 1.0), bins)
    x2 = _quantize((y[:, 2] + cf[:, 1] * x0 + cf[:, 2] * x1).clamp(-1.0, 1.0), bins)
    return torch.stack([x0, x1, x2], dim=1)


def sample_discretized_mix_logistic_ref(params, num_mixtures, generator=None, noise=None, temperature=1.0,
                                        num_bits=8):
    """Reference sampler (any device and dtype; see the module docstring)."""
    op = "sample_discretized_mix_logistic_ref"
    c, noise_shape, out_shape, p3 = _check_dml_sample(op, params, num_mixtures, noise, temperature, num_bits)
    if noise is None:
        noise = _sample_noise(params, noise_shape, generator)
    u3 = noise.reshape(noise_shape[0], 1 + c, p3.shape[2])  # explicit N: -1 is ambiguous for an empty batch
    return _dml_sample_ref(p3, u3, num_mixtures, c, temperature, num_bits).reshape(out_shape)


def sample_discretized_mix_logistic(params, num_mixtures, generator=None, noise=None, temperature=1.0, num_bits=8):
    """Draw x from the discretized logistic mixture in params, one fused pass per position.

    params: (B, 3K or 10K, H, W) or audio (B, 3K, T); noise: None (drawn with `generator`) or uniforms of
    shape (B, 1 + C, H, W) / (B, 2, T). Returns (B, C, H, W) / (B, T) at the bin centres in [-1, 1],
    float64 for float64 params, else float32. Given `noise`, kernel and reference return the same values
    (see the module docstring). PyTorch equivalent: :func:`sample_discretized_mix_logistic_ref`.
    """
    op = "sample_discretized_mix_logistic"
    c, noise_shape, out_shape, p3 = _check_dml_sample(op, params, num_mixtures, noise, temperature, num_bits)
    if noise is None:
        noise = _sample_noise(params, noise_shape, generator)
    u3 = noise.reshape(noise_shape[0], 1 + c, p3.shape[2])  # explicit N: -1 is ambiguous for an empty batch
    if _backend.use_kernel(op, params.device, params.dtype, DML_KERNEL_DTYPES):
        # Samples are not differentiable (they sit on bin centres): detach so autograd never sees the op.
        out = torch.ops.fastar.sample_discretized_mix_logistic(p3.detach(), u3.to(_acc_dtype(params.dtype)),
                                                               num_mixtures, num_bits, float(temperature))
    else:
        out = _dml_sample_ref(p3, u3, num_mixtures, c, temperature, num_bits)
    return out.reshape(out_shape)


# Registrations only when this build of _C has the ops (a stale build falls back to the reference).
if _backend.has_ops("discretized_mix_logistic_nll", "discretized_mix_logistic_nll_backward", "sample_discretized_mix_logistic", "categorical_sample"):

    @torch.library.register_fake("fastar::categorical_sample")
    def _categorical_sample_fake(logits, noise, temperature, top_k):
        return logits.new_empty((logits.shape[0], logits.shape[2]), dtype=torch.int64)

    @torch.library.register_fake("fastar::discretized_mix_logistic_nll")
    def _dml_nll_fake(x, params, num_mixtures, num_bits):
        return x.new_empty((x.shape[0], x.shape[2]))

    @torch.library.register_fake("fastar::discretized_mix_logistic_nll_backward")
    def _dml_nll_backward_fake(grad, x, params, nll, num_mixtures, num_bits, output_mask):
        gx = x.new_empty(x.shape) if output_mask[0] else x.new_empty(0)
        gp = params.new_empty(params.shape) if output_mask[1] else params.new_empty(0)
        return gx, gp

    if _backend.has_ops("dml_value_log_probs"):
        @torch.library.register_fake("fastar::dml_value_log_probs")
        def _dml_value_fake(params, prev, num_mixtures, j, num_bits):
            return prev.new_empty((params.shape[0], 2 ** num_bits))

    @torch.library.register_fake("fastar::sample_discretized_mix_logistic")
    def _dml_sample_fake(params, noise, num_mixtures, num_bits, temperature):
        return noise.new_empty((noise.shape[0], noise.shape[1] - 1, noise.shape[2]))

    def _dml_setup_context(ctx, inputs, output):
        x, params, num_mixtures, num_bits = inputs
        ctx.save_for_backward(x, params, output)
        ctx.num_mixtures, ctx.num_bits = num_mixtures, num_bits

    def _dml_backward(ctx, grad):
        x, params, nll = ctx.saved_tensors
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
        if torch.is_grad_enabled():
            # create_graph=True: the kernel's backward has no derivative; differentiate the reference.
            c = 1 if params.shape[1] == 3 * ctx.num_mixtures else 3
            gx, gp = reference_grads(
                lambda x_, p_: _dml_nll_pixels_ref(x_, p_, ctx.num_mixtures, c, ctx.num_bits), (x, params), need, grad)
            return gx, gp, None, None
        gx, gp = torch.ops.fastar.discretized_mix_logistic_nll_backward(
            grad.contiguous(), x, params, nll, ctx.num_mixtures, ctx.num_bits, need)
        return (gx if need[0] else None, gp if need[1] else None, None, None)

    torch.library.register_autograd("fastar::discretized_mix_logistic_nll", _dml_backward,
                                    setup_context=_dml_setup_context)

    def _no_setup(ctx, inputs, output):
        pass

    torch.library.register_autograd("fastar::discretized_mix_logistic_nll_backward",
                                    no_double_backward("discretized_mix_logistic_nll_backward"),
                                    setup_context=_no_setup)
