"""WaveNet (van den Oord et al. 2016) with queue-based fast generation.

Training runs the usual full-sequence layers (:class:`fastar.nn.CausalConv1d`); generation
either re-runs the forward pass on the receptive-field window for every sample
(``method="naive"``) or keeps one ring buffer per layer and runs one fused
:func:`fastar.ops.wavenet_step` per sample (``method="fast"``, a CUDA graph on CUDA).
Both consume the same uniforms (drawn up front from ``generator``), so from the same seed
they return the same sequence.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastar.models.spec import ModelSpec, register
from fastar.nn.causal_conv import CausalConv1d
from fastar.models.base import AutoregressiveModel
from fastar.ops.mixture import discretized_mix_logistic_nll
from fastar.ops.wavenet import WaveNetWeights, queue_sizes, wavenet_step_packed

__all__ = ["WaveNet"]


class WaveNet(AutoregressiveModel):
    """WaveNet over mu-law codes (softmax head) or raw audio (discretized logistic mixture head).

    ``layers`` counts all layers, split evenly over ``stacks``; dilations are 1, 2, 4, ...
    restarting in each stack. Layer l: ``a = W_l * h (dilated causal conv, kernel_size) +
    V_g g + V_c c_t``; ``z = tanh(a_f) * sigmoid(a_g)``; ``h += res_l(z)``; ``skip += skip_l(z)``.
    Head: ``ReLU -> 1x1 (S->S) -> ReLU -> 1x1 (S->quantization)`` (softmax) or
    ``(S -> 3 * num_mixtures)`` (mixture: K logits, K means, K log-scales).

    Input x: (B, T) int64 codes in [0, quantization) (softmax) or floats in [-1, 1]
    (mixture). The output at t sees x[:, :t] only (the input is shifted right by one, with
    the mu-law zero code ``quantization // 2``, or 0.0, in front).

    Mixture head (``output="mixture"``): the model works on raw (linear, not mu-law) audio values
    in [-1, 1], discretized to ``2**num_bits`` levels (default 8 bits: the bin centres
    ``-1 + 2 i / 255``); ``quantization`` is then unused. The input embedding is the 1x1 conv of
    the previous scalar sample (``input_conv`` has 1 input channel), the head gives (B, 3K, T)
    parameters in the layout of :func:`fastar.ops.discretized_mix_logistic_nll`'s audio variant,
    ``nll`` is that loss per sample, and ``generate`` returns (B, T) floats at the bin centres
    (float64 for a float64 model, else float32).

    Conditioning: ``global_cond`` (B,) int64 speaker ids when ``num_speakers`` is set (an
    embedding of ``global_cond_channels``), else (B, global_cond_channels) floats.
    ``local_cond`` (B, local_cond_channels, T') at a lower rate, upsampled by transposed
    convolutions with strides ``upsample_factors`` (none: already at the sample rate); after
    upsampling it must cover every sample. Devices: any; dtypes: any floating.
    """

    def __init__(self, layers: int = 20, stacks: int = 2, residual_channels: int = 64, dilation_channels: int = 64,
                 skip_channels: int = 256, quantization: int = 256, kernel_size: int = 2,
                 global_cond_channels: int | None = None, num_speakers: int | None = None,
                 local_cond_channels: int | None = None, upsample_factors=None, output: str = "softmax",
                 num_mixtures: int = 10, num_bits: int = 8):
        super().__init__()
        for k, v in (("layers", layers), ("stacks", stacks), ("residual_channels", residual_channels),
                     ("dilation_channels", dilation_channels), ("skip_channels", skip_channels),
                     ("kernel_size", kernel_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"WaveNet: {k} must be a positive int, got {v!r}")
        if output == "softmax" and (isinstance(quantization, bool) or not isinstance(quantization, int)
                                    or quantization < 2):
            raise ValueError(f"WaveNet: quantization must be an int >= 2 (the number of codes), got {quantization!r}")
        for k, v in (("global_cond_channels", global_cond_channels), ("num_speakers", num_speakers),
                     ("local_cond_channels", local_cond_channels)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"WaveNet: {k} must be None or a positive int, got {v!r}")
        if layers % stacks:
            raise ValueError(f"WaveNet: layers ({layers}) must be a positive multiple of stacks ({stacks})")
        if output not in ("softmax", "mixture"):
            raise ValueError(f"WaveNet: output must be 'softmax' or 'mixture', got {output!r}")
        if num_speakers is not None and global_cond_channels is None:
            raise ValueError("WaveNet: num_speakers needs global_cond_channels (the speaker embedding size)")
        if upsample_factors and local_cond_channels is None:
            raise ValueError("WaveNet: upsample_factors needs local_cond_channels")
        R, D, S = residual_channels, dilation_channels, skip_channels
        per = layers // stacks
        self.dilations = [2 ** (i % per) for i in range(layers)]
        self.layers, self.stacks, self.kernel_size = layers, stacks, kernel_size
        self.residual_channels, self.dilation_channels, self.skip_channels = R, D, S
        self.quantization, self.output, self.num_mixtures = quantization, output, num_mixtures
        if output == "mixture" and (isinstance(num_mixtures, bool) or not isinstance(num_mixtures, int)
                                    or num_mixtures < 1):
            raise ValueError(f"WaveNet: num_mixtures must be a positive int, got {num_mixtures!r}")
        if output == "mixture" and (isinstance(num_bits, bool) or not isinstance(num_bits, int)
                                    or not 1 <= num_bits <= 16):
            raise ValueError(f"WaveNet: num_bits must be an int in [1, 16], got {num_bits!r}")
        self.num_bits = num_bits
        self.global_cond_channels, self.num_speakers = global_cond_channels, num_speakers
        self.local_cond_channels = local_cond_channels
        self.upsample_factors = list(upsample_factors or [])
        self.input_conv = CausalConv1d(quantization if output == "softmax" else 1, R, 1)
        self.dilated_convs = nn.ModuleList(CausalConv1d(R, 2 * D, kernel_size, d) for d in self.dilations)
        self.res_convs = nn.ModuleList(nn.Conv1d(D, R, 1) for _ in self.dilations)
        self.skip_convs = nn.ModuleList(nn.Conv1d(D, S, 1) for _ in self.dilations)
        if global_cond_channels:
            self.speaker_embedding = nn.Embedding(num_speakers, global_cond_channels) if num_speakers else None
            self.gc_convs = nn.ModuleList(nn.Conv1d(global_cond_channels, 2 * D, 1, bias=False)
                                          for _ in self.dilations)
        if local_cond_channels:
            self.upsample = nn.ModuleList(nn.ConvTranspose1d(local_cond_channels, local_cond_channels, f, stride=f)
                                          for f in self.upsample_factors)
            self.lc_convs = nn.ModuleList(nn.Conv1d(local_cond_channels, 2 * D, 1, bias=False)
                                          for _ in self.dilations)
        self.out1 = nn.Conv1d(S, S, 1)
        self.out2 = nn.Conv1d(S, quantization if output == "softmax" else 3 * num_mixtures, 1)

    @property
    def receptive_field(self) -> int:
        """How many samples (the current input included) the output at t depends on."""
        return 1 + sum(queue_sizes(self.dilations, self.kernel_size))

    @property
    def start_code(self) -> int:
        return self.quantization // 2

    @property
    def _mixture(self) -> bool:
        return self.output == "mixture"

    @property
    def upsample_factor(self) -> int:
        return math.prod(self.upsample_factors) if self.upsample_factors else 1

    # ---- conditioning --------------------------------------------------------------------

    def _global_vector(self, global_cond, batch):
        if not self.global_cond_channels:
            if global_cond is not None:
                raise ValueError("WaveNet: global_cond given but the model was built without global_cond_channels")
            return None
        if global_cond is None:
            raise ValueError("WaveNet: this model is globally conditioned; pass global_cond")
        if self.num_speakers:
            if global_cond.dtype != torch.int64 or global_cond.dim() != 1:
                raise ValueError(f"WaveNet: global_cond must be (B,) int64 speaker ids, got {global_cond.dtype} of "
                                 f"shape {list(global_cond.shape)}")
            if global_cond.numel() and (int(global_cond.min()) < 0 or int(global_cond.max()) >= self.num_speakers):
                raise ValueError(f"WaveNet: speaker ids must lie in [0, {self.num_speakers}), got range "
                                 f"[{int(global_cond.min())}, {int(global_cond.max())}]")
            g = self.speaker_embedding(global_cond)
        else:
            if not global_cond.is_floating_point() or global_cond.dim() != 2 or \
                    global_cond.shape[1] != self.global_cond_channels:
                raise ValueError(f"WaveNet: global_cond must be (B, {self.global_cond_channels}), got "
                                 f"{list(global_cond.shape)}")
            g = global_cond.to(self.out1.weight.dtype)
        if g.shape[0] != batch:
            raise ValueError(f"WaveNet: global_cond has batch {g.shape[0]} but the audio has batch {batch}")
        return g

    def _local_features(self, local_cond, batch, length):
        """(B, C, T') -> upsampled (B, C, length)."""
        if not self.local_cond_channels:
            if local_cond is not None:
                raise ValueError("WaveNet: local_cond given but the model was built without local_cond_channels")
            return None
        if local_cond is None:
            raise ValueError("WaveNet: this model is locally conditioned; pass local_cond")
        if not isinstance(local_cond, torch.Tensor) or not local_cond.is_floating_point() or local_cond.dim() != 3 \
                or local_cond.shape[1] != self.local_cond_channels:
            raise ValueError(f"WaveNet: local_cond must be (B, {self.local_cond_channels}, frames) floats, got "
                             f"{getattr(local_cond, 'dtype', type(local_cond).__name__)} of shape "
                             f"{list(getattr(local_cond, 'shape', []))}")
        if local_cond.shape[0] != batch:
            raise ValueError(f"WaveNet: local_cond has batch {local_cond.shape[0]} but the audio has batch {batch}")
        covered = local_cond.shape[2] * self.upsample_factor
        if covered < length:
            raise ValueError(f"WaveNet: local_cond has {local_cond.shape[2]} frames, which upsampled by "
                             f"{self.upsample_factor} cover {covered} samples, but {length} are needed")
        c = local_cond.to(self.out1.weight.dtype)
        for i, up in enumerate(self.upsample):
            c = up(c)
            if i + 1 < len(self.upsample):
                c = F.leaky_relu(c, 0.4)
        return c[:, :, :length]

    # ---- training forward ----------------------------------------------------------------

    def _shifted_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"WaveNet: x must be a (B, T) tensor, got {type(x).__name__}")
        if x.dim() == 2 and x.shape[1] == 0:
            raise ValueError("WaveNet: x must hold at least one sample per clip (T >= 1), got T = 0")
        if self.output == "softmax":
            if x.dtype != torch.int64 or x.dim() != 2:
                raise ValueError(f"WaveNet: x must be (B, T) int64 mu-law codes, got {x.dtype} of shape "
                                 f"{list(x.shape)}")
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.quantization):
                raise ValueError(f"WaveNet: codes must lie in [0, {self.quantization}), got range "
                                 f"[{int(x.min())}, {int(x.max())}]")
            return torch.cat([torch.full_like(x[:, :1], self.start_code), x[:, :-1]], 1)
        if not x.is_floating_point() or x.dim() != 2:
            raise ValueError(f"WaveNet: x must be (B, T) floats in [-1, 1], got {x.dtype} of shape {list(x.shape)}")
        if x.numel() and not bool(((x >= -1) & (x <= 1)).all()):
            raise ValueError("WaveNet: audio values must lie in [-1, 1] (and not be NaN)")
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)

    def _embed(self, inp):
        """Shifted inputs (B, T) -> (B, R, T): the 1x1 input conv (on one-hot codes for softmax)."""
        w, b = self.input_conv.weight[:, :, 0], self.input_conv.bias
        if self.output == "softmax":
            return (F.embedding(inp, w.t()) + b).transpose(1, 2)
        return self.input_conv(inp.unsqueeze(1).to(w.dtype))

    def _stack(self, h, g, c):
        skip = 0
        D = self.dilation_channels
        for i in range(self.layers):
            a = self.dilated_convs[i](h)
            if g is not None:
                a = a + self.gc_convs[i](g.unsqueeze(-1))
            if c is not None:
                a = a + self.lc_convs[i](c)
            z = torch.tanh(a[:, :D]) * torch.sigmoid(a[:, D:])
            skip = skip + self.skip_convs[i](z)
            h = h + self.res_convs[i](z)
        return self.out2(F.relu(self.out1(F.relu(skip))))

    def forward(self, x, global_cond=None, local_cond=None):
        """x (B, T) -> (B, quantization, T) logits (softmax) or (B, 3K, T) mixture parameters."""
        inp = self._shifted_input(x)
        g = self._global_vector(global_cond, x.shape[0])
        c = self._local_features(local_cond, x.shape[0], x.shape[1])
        return self._stack(self._embed(inp), g, c)

    def nll(self, x, global_cond=None, local_cond=None):
        """Negative log-likelihood per example in nats, (B,): the sum over the T samples.

        Softmax head: cross-entropy over the codes. Mixture head: x (B, T) floats in [-1, 1]
        (values off the bin centres are scored in the bin that holds them), the per-sample
        :func:`fastar.ops.discretized_mix_logistic_nll` summed over time.
        """
        out = self(x, global_cond, local_cond)
        if self.output == "softmax":
            return F.cross_entropy(out, x, reduction="none").sum(1)
        acc = torch.float64 if out.dtype == torch.float64 else torch.float32
        return discretized_mix_logistic_nll(x.to(acc), out, self.num_mixtures, num_bits=self.num_bits,
                                            reduction="none")                    # (B,): summed over time

    def log_prob(self, x, global_cond=None, local_cond=None):
        """Log-likelihood per example in nats, (B,)."""
        return -self.nll(x, global_cond, local_cond)

    def bits_per_dim(self, x, global_cond=None, local_cond=None):
        """Bits per audio sample, per example, (B,): nll / (T ln 2)."""
        return self.nll(x, global_cond, local_cond) / (x.shape[1] * math.log(2.0))

    def loss(self, x, global_cond=None, local_cond=None):
        """Mean NLL per example in nats (a scalar to minimise)."""
        nll = self.nll(x, global_cond, local_cond)
        if not nll.numel():
            raise ValueError("WaveNet.loss: the batch is empty (a mean over no clips is undefined)")
        return nll.mean()

    # ---- generation ----------------------------------------------------------------------

    def pack(self) -> WaveNetWeights:
        """The weights in :func:`fastar.ops.wavenet_step`'s layouts ((in, out) matrices), packed once per run."""
        L, k = self.layers, self.kernel_size
        w_in = self.input_conv.weight[:, :, 0]
        conv_w = torch.stack([m.weight.permute(2, 1, 0) for m in self.dilated_convs])  # (L, k, R, 2D)
        conv_b = torch.stack([m.bias for m in self.dilated_convs])
        rs_w = torch.stack([torch.cat([r.weight[:, :, 0], s.weight[:, :, 0]], 0).t()
                            for r, s in zip(self.res_convs, self.skip_convs)])  # (L, D, R + S)
        rs_b = torch.stack([torch.cat([r.bias, s.bias]) for r, s in zip(self.res_convs, self.skip_convs)])
        assert conv_w.shape[:2] == (L, k)
        return WaveNetWeights(
            in_w=w_in.t().contiguous(), in_b=self.input_conv.bias.contiguous(), conv_w=conv_w.contiguous(),
            conv_b=conv_b.contiguous(), res_skip_w=rs_w.contiguous(), res_skip_b=rs_b.contiguous(),
            out1_w=self.out1.weight[:, :, 0].t().contiguous(), out1_b=self.out1.bias.contiguous(),
            out2_w=self.out2.weight[:, :, 0].t().contiguous(), out2_b=self.out2.bias.contiguous(),
            dilations=list(self.dilations))

    def step_cond(self, g, c):
        """Per-step conditioning (B, Tc, L, 2D) for wavenet_step, or None."""
        out = None
        if g is not None:
            wg = torch.stack([m.weight[:, :, 0] for m in self.gc_convs])  # (L, 2D, G)
            out = torch.einsum("bg,log->blo", g, wg).unsqueeze(1)
        if c is not None:
            wc = torch.stack([m.weight[:, :, 0] for m in self.lc_convs])  # (L, 2D, C)
            lc = torch.einsum("bct,loc->btlo", c, wc)
            out = lc if out is None else lc + out
        return None if out is None else out.contiguous()

    @torch.no_grad()
    def sample(self, n: int | None = None, shape=None, cond=None, generator: torch.Generator | None = None,
               temperature: float = 1.0, method: str = "cached", prime=None, progress: bool = True,
               **engine):
        """Draw ``n`` clips of ``shape = (T,)`` (or an int T) new samples: (n, T) int64 codes
        (softmax head) or floats in [-1, 1] at the ``2**num_bits`` bin centres (mixture head;
        float64 for a float64 model, else float32).

        cond: ``global_cond`` ((B,) speaker ids or (B, G) floats), or a tuple ``(global_cond,
        local_cond)`` (either may be None; local_cond must cover the prime and the new samples).
        prime (B, P) int64 codes (floats in [-1, 1] for the mixture head): given audio to continue;
        the result holds only the new samples. method: "cached" (ring-buffer queues; the fused
        :func:`fastar.ops.wavenet_step` where it is built, several steps per call, a CUDA graph on
        CUDA) or "naive" (the full forward pass over the receptive-field window per sample). Every
        method consumes the same uniforms drawn up front from ``generator``, so from one seed
        they return the same audio. ``engine``: :func:`fastar.sampling.sample`'s options.
        """
        from fastar import sampling

        return sampling.sample(self, n=n, shape=shape, cond=cond, generator=generator, temperature=temperature,
                               method=method, progress=progress, prime=prime, **engine)

    @torch.no_grad()
    def generate(self, num_samples: int, batch_size: int = 1, global_cond=None, local_cond=None, prime=None,
                 temperature: float = 1.0, generator: torch.Generator | None = None, method: str = "fast",
                 progress: bool = True, return_logits: bool = False, use_cuda_graph: bool = True):
        """The older spelling of :meth:`sample`: ``method="fast"`` is ``"cached"``; returns (B,
        num_samples) and, with ``return_logits``, the per-step head outputs (B, A, num_samples)
        (A = quantization, or 3K mixture parameters)."""
        if method not in ("fast", "naive"):
            raise ValueError(f"WaveNet.generate: method must be 'fast' or 'naive', got {method!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"WaveNet.generate: num_samples must be a non-negative int, got {num_samples!r}")
        if prime is not None and isinstance(prime, torch.Tensor) and prime.dim() == 2:
            if prime.shape[0] != batch_size and batch_size != 1:
                raise ValueError(f"WaveNet.generate: prime has batch {prime.shape[0]} but batch_size is {batch_size}")
            batch_size = prime.shape[0]
        P = 0 if prime is None else prime.shape[-1]
        if num_samples == 0:
            dev, acc = self.out1.weight.device, self._acc
            empty = torch.zeros(batch_size, 0, dtype=acc if self._mixture else torch.int64, device=dev)
            return (empty, torch.zeros(batch_size, self.out2.weight.shape[0], 0, dtype=acc, device=dev)) \
                if return_logits else empty
        out = self.sample(batch_size, (num_samples,), cond=(global_cond, local_cond), generator=generator,
                          temperature=temperature, method="cached" if method == "fast" else "naive", prime=prime,
                          progress=progress, return_params=return_logits,
                          cuda_graphs=None if use_cuda_graph else False)
        if return_logits:
            x, params = out
            return x, params.permute(1, 2, 0)[:, :, P:]
        return out

    # ---- the generation protocol (fastar.sampling) ------------------------------------------

    @property
    def _acc(self):
        return torch.float64 if self.out1.weight.dtype == torch.float64 else torch.float32

    def _split_cond(self, cond):
        if isinstance(cond, (tuple, list)):
            if len(cond) != 2:
                raise ValueError("WaveNet: cond must be global_cond or a tuple (global_cond, local_cond)")
            return cond[0], cond[1]
        return cond, None

    def sequence(self, n=None, shape=None, cond=None, num_prime=0):
        """The :class:`fastar.sampling.Sequence` of one run: P + T steps (the engine gives the first
        P from the call's prime), values in time order; ``sample`` returns the T new ones."""
        from fastar.sampling import Categorical, LogisticMixture, Sequence

        if shape is None:
            raise ValueError("WaveNet.sample: shape (T,) (the number of new samples) is needed")
        shp = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else tuple(shape)
        if len(shp) != 1 or isinstance(shp[0], bool) or not isinstance(shp[0], int) or shp[0] < 1:
            raise ValueError(f"WaveNet.sample: shape must be (T,) or an int T >= 1, got {shape!r}")
        mixture, acc = self._mixture, self._acc
        if n is None:
            n = 1
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"WaveNet.sample: n must be a positive int, got {n!r}")
        P = int(num_prime)
        T = P + shp[0]
        gc, lc = self._split_cond(cond)
        g = self._global_vector(gc, n)
        c = self._local_features(lc, n, T)
        head = LogisticMixture(self.num_mixtures, self.num_bits) if mixture else Categorical(self.quantization)

        def forward(values, t=None):
            inp = torch.cat([torch.full_like(values[:, :1], 0.0 if mixture else self.start_code), values[:, :-1]], 1)
            if t is None:
                return self._stack(self._embed(inp), g, c).to(acc).permute(2, 0, 1)
            lo = max(0, t + 1 - self.receptive_field)   # the output at t sees no further back
            h = self._embed(inp[:, lo:t + 1])
            return self._stack(h, g, None if c is None else c[:, :, lo:t + 1])[:, :, -1].to(acc)

        return Sequence(n=n, steps=T, head=head, forward=forward, shape=(shp[0],), out_slots=torch.arange(P, T),
                        cond=(g, c), num_prime=P, step_cond=self.step_cond(g, c))

    def allocate_inference_cache(self, run, fused=None):
        """The ring-buffer queues of one run (:mod:`fastar.models.wavenet_cache`)."""
        from fastar.models.wavenet_cache import allocate

        return allocate(self, run, fused)

    @torch.no_grad()
    def generate_reference_queue(self, samples, noise, global_cond=None, local_cond=None, num_prime=0,
                                 temperature=1.0):
        """The "PyTorch queue" path (:func:`fastar.ops.wavenet_step_ref` per step), for benchmarks and checks.

        samples (B, T) int64 (mixture head: floats in the acc dtype) holds the prime in its first
        ``num_prime`` columns and receives the draws; noise is (B, T) (mixture head: (B, 2, T)).
        """
        B, T = samples.shape
        g = self._global_vector(global_cond, B)
        c = self._local_features(local_cond, B, T)
        w = self.pack()
        queues = torch.zeros(B, sum(queue_sizes(self.dilations, self.kernel_size)), self.residual_channels,
                             dtype=noise.dtype, device=samples.device)
        position = torch.zeros(1, dtype=torch.int64, device=samples.device)
        logits = torch.empty(B, self.out2.weight.shape[0], dtype=noise.dtype, device=samples.device)
        cond = self.step_cond(g, c)
        for _ in range(T):
            wavenet_step_packed(samples, queues, position, logits, noise, cond, w, num_prime, temperature,
                                self.start_arg, reference=True, **self.head_kwargs())
        return samples

    @property
    def start_arg(self) -> int:
        # wavenet_step ignores `start` for the mixture head (its first input is 0.0)
        return 0 if self._mixture else self.start_code

    def head_kwargs(self):
        return dict(num_mixtures=self.num_mixtures, num_bits=self.num_bits) if self._mixture else {}


# ---------------------------------------------------------------------------- registration

def _audio_config(data: dict) -> dict:
    return dict(layers=10, stacks=1, residual_channels=32, dilation_channels=32, skip_channels=64,
                quantization=data["levels"])


register(ModelSpec(
    name="wavenet", cls=WaveNet, kind="audio", datasets=("speech",), default_config=_audio_config, writer="wav",
    shipped=("wavenet_speech",), demo=dict(data="speech", batch_size=8, lr=1e-3),
    tiny=(dict(config=dict(layers=2, stacks=1, residual_channels=6, dilation_channels=6, skip_channels=16,
                           quantization=3), shape=(3,)),
          dict(config=dict(layers=3, stacks=1, residual_channels=6, dilation_channels=6, skip_channels=16,
                           quantization=3, kernel_size=3), shape=(3,)),
          dict(config=dict(layers=2, stacks=1, residual_channels=6, dilation_channels=6, skip_channels=16,
                           output="mixture", num_mixtures=2, num_bits=2), shape=(3,)),
          dict(config=dict(layers=2, stacks=1, residual_channels=6, dilation_channels=6, skip_channels=16,
                           quantization=3, num_speakers=2, global_cond_channels=3), shape=(3,), cond=1)),
    description="WaveNet: dilated causal convolutions, gated units, global/local conditioning"))
