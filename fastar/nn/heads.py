"""Output heads: the distribution a model's last layer parameterises, with its loss and its sampler.

A head holds no parameters; it tells the model how many output channels to produce
(``param_channels``), scores data against them (``nll``) and draws from them (``sample``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastar.ops.mixture import categorical_sample, discretized_mix_logistic_nll, sample_discretized_mix_logistic

__all__ = ["DiscretizedMixLogistic", "Categorical256"]

_REDUCTIONS = ("none", "sum", "mean")


class DiscretizedMixLogistic(nn.Module):
    """PixelCNN++ discretized logistic mixture head (openai/pixel-cnn parameter layout).

    ``DiscretizedMixLogistic(num_mixtures, channels=3, num_bits=8)``; the model outputs
    params of shape (B, param_channels, H, W) for images ((B, param_channels, T) for audio,
    channels=1), with ``param_channels = 3K`` for 1 channel and ``10K`` for 3.

    * ``nll(x, params, reduction="sum")``: x (B, C, H, W) or (B, T) in [-1, 1]; NLL in nats,
      (B,) for "none". Same as :func:`fastar.ops.discretized_mix_logistic_nll`.
    * ``sample(params, generator=None, noise=None, temperature=1.0)``: (B, C, H, W) / (B, T)
      at the bin centres. Same as :func:`fastar.ops.sample_discretized_mix_logistic`.
    * ``forward(x, params)`` is ``nll``.

    Devices and dtypes: those of the ops (kernels on CPU float32/64 and CUDA float32/64/16/bf16).
    """

    def __init__(self, num_mixtures: int, channels: int = 3, num_bits: int = 8):
        super().__init__()
        if not isinstance(num_mixtures, int) or isinstance(num_mixtures, bool) or num_mixtures < 1:
            raise ValueError(f"DiscretizedMixLogistic: num_mixtures must be a positive int, got {num_mixtures!r}")
        if channels not in (1, 3):
            raise ValueError(f"DiscretizedMixLogistic: channels must be 1 or 3, got {channels!r}")
        if not isinstance(num_bits, int) or not 1 <= num_bits <= 16:
            raise ValueError(f"DiscretizedMixLogistic: num_bits must be an int in [1, 16], got {num_bits!r}")
        self.num_mixtures = num_mixtures
        self.channels = channels
        self.num_bits = num_bits

    @property
    def param_channels(self) -> int:
        """Output channels the model must produce: 3K for 1 channel, 10K for 3."""
        return (3 if self.channels == 1 else 10) * self.num_mixtures

    def nll(self, x: torch.Tensor, params: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return discretized_mix_logistic_nll(x, params, self.num_mixtures, self.num_bits, reduction)

    def forward(self, x: torch.Tensor, params: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return self.nll(x, params, reduction)

    def sample(self, params: torch.Tensor, generator=None, noise=None, temperature: float = 1.0) -> torch.Tensor:
        return sample_discretized_mix_logistic(params, self.num_mixtures, generator, noise, temperature,
                                               self.num_bits)

    def extra_repr(self) -> str:
        return f"num_mixtures={self.num_mixtures}, channels={self.channels}, num_bits={self.num_bits}"


class Categorical256(nn.Module):
    """Softmax head over 256 levels per sub-pixel (PixelCNN, PixelRNN) or audio sample (WaveNet).

    ``Categorical256(channels=1, num_classes=256)``; the model outputs logits of shape
    (B, param_channels, *S) with ``param_channels = channels * num_classes``, colour-major
    (channel ``c * num_classes + v`` is level v of colour c, so RGB channel groups stay blocked),
    where S is (H, W) for images or (T,) for audio.

    * ``nll(x, logits, reduction="sum")``: x int64 codes in [0, num_classes) of shape
      (B, channels, *S) (or (B, *S) when channels=1); cross-entropy in nats summed per item:
      (B,) for "none", else their sum / batch mean. Equals
      ``F.cross_entropy(logits.view(B, C, V, *S).movedim(2, 1), x, reduction="none").flatten(1).sum(1)``.
    * ``sample(logits, generator=None, noise=None, temperature=1.0, top_k=None)``: int64 codes
      (B, channels, *S), or (B, T) for 3-D audio logits with channels=1, via
      :func:`fastar.ops.categorical_sample` (noise: uniforms of the codes' shape).
    * ``forward(x, logits)`` is ``nll``.
    """

    def __init__(self, channels: int = 1, num_classes: int = 256):
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"Categorical256: channels must be a positive int, got {channels!r}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"Categorical256: num_classes must be an int >= 2, got {num_classes!r}")
        self.channels = channels
        self.num_classes = num_classes

    @property
    def param_channels(self) -> int:
        return self.channels * self.num_classes

    def _split(self, name: str, logits: torch.Tensor) -> torch.Tensor:
        """(B, C * V, *S) -> (B, C, V, *S)."""
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise TypeError(f"Categorical256.{name}: logits must be a floating-point tensor")
        if logits.dim() < 2 or logits.shape[1] != self.param_channels:
            raise ValueError(f"Categorical256.{name}: logits must be (B, {self.param_channels}, ...) "
                             f"({self.channels} x {self.num_classes}), got shape {list(logits.shape)}")
        return logits.view(logits.shape[0], self.channels, self.num_classes, *logits.shape[2:])

    def nll(self, x: torch.Tensor, logits: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        if reduction not in _REDUCTIONS:
            raise ValueError(f"Categorical256.nll: reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
        lg = self._split("nll", logits)
        target_shape = (lg.shape[0], self.channels) + tuple(lg.shape[3:])
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
            raise TypeError(f"Categorical256.nll: x must be an int64 tensor of codes, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if self.channels == 1 and tuple(x.shape) == (target_shape[0],) + target_shape[2:]:
            x = x.unsqueeze(1)
        if tuple(x.shape) != target_shape:
            raise ValueError(f"Categorical256.nll: x must have shape {list(target_shape)} to match logits of shape "
                             f"{list(logits.shape)}, got {list(x.shape)}")
        ce = F.cross_entropy(lg.movedim(2, 1), x, reduction="none")
        per_item = ce.flatten(1).sum(1)
        if reduction == "none":
            return per_item
        return per_item.sum() if reduction == "sum" else per_item.mean()

    def forward(self, x: torch.Tensor, logits: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return self.nll(x, logits, reduction)

    def sample(self, logits: torch.Tensor, generator=None, noise=None, temperature: float = 1.0,
               top_k=None) -> torch.Tensor:
        lg = self._split("sample", logits)
        if noise is not None and self.channels == 1 and noise.dim() == lg.dim() - 2:
            noise = noise.unsqueeze(1)
        out = categorical_sample(lg, dim=2, generator=generator, noise=noise, temperature=temperature, top_k=top_k)
        return out.squeeze(1) if self.channels == 1 and logits.dim() == 3 else out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_classes={self.num_classes}"
