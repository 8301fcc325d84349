// Shared argument checks and shape logic for the dilated-causal-queue family,
// used by the CPU and the CUDA kernels so both reject bad input with the same
// sentences.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <vector>
#include "common/macros.h"

namespace fastar {
inline namespace FASTAR_TU_NAMESPACE {  // see common/macros.h

struct ConvUpdateShape {
  int64_t B, C_in, C_out, k, N, dilation;
};

inline ConvUpdateShape check_causal_conv1d_update(const char* op, const at::Tensor& x, const at::Tensor& state,
                                                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                                  int64_t dilation, const at::Tensor& position) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (B, C_in), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 3, op, ": weight must be 3-D (C_out, C_in, k), got shape ", weight.sizes());
  TORCH_CHECK(state.dim() == 3, op, ": state must be 3-D (B, C_in, (k-1)*dilation), got shape ", state.sizes());
  TORCH_CHECK(dilation >= 1, op, ": dilation must be at least 1, got ", dilation);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && state.scalar_type() == x.scalar_type(), op,
              ": weight (", weight.scalar_type(), ") and state (", state.scalar_type(), ") must match x dtype ",
              x.scalar_type());
  TORCH_CHECK(weight.device() == x.device() && state.device() == x.device() && position.device() == x.device(), op,
              ": x, state, weight and position must be on one device, got x on ", x.device(), ", state on ",
              state.device(), ", weight on ", weight.device(), ", position on ", position.device());
  TORCH_CHECK(position.scalar_type() == at::kLong && position.numel() == 1, op,
              ": position must be a one-element int64 tensor, got ", position.scalar_type(), " of shape ",
              position.sizes());
  ConvUpdateShape s{x.size(0), x.size(1), weight.size(0), weight.size(2), 0, dilation};
  TORCH_CHECK(weight.size(1) == s.C_in, op, ": x has ", s.C_in, " channels but weight expects ", weight.size(1),
              " (weight shape ", weight.sizes(), ")");
  TORCH_CHECK(s.k >= 1, op, ": weight must have a kernel size of at least 1, got shape ", weight.sizes());
  s.N = (s.k - 1) * dilation;
  TORCH_CHECK(state.size(0) == s.B && state.size(1) == s.C_in && state.size(2) == s.N, op,
              ": state must have shape [", s.B, ", ", s.C_in, ", ", s.N,
              "] (batch, channels, (kernel_size - 1) * dilation), got ", state.sizes());
  TORCH_CHECK(state.is_contiguous(), op, ": state must be contiguous (it is updated in place)");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.C_out, op, ": bias must be 1-D of length ", s.C_out,
                " (out channels), got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(), op,
                ": bias must be ", x.scalar_type(), " on ", x.device(), ", got ", bias->scalar_type(), " on ",
                bias->device());
  }
  return s;
}

struct StepShape {
  int64_t B, T, L, k, R, D, S, A, Tc, Ntot;
  std::vector<int64_t> offsets;  // queue row offset of each layer
};

// wavenet_step's `Tensor[] pack`: the weights in this order (fastar/ops/wavenet.py's
// WaveNetWeights.to_pack; the module docstring gives every layout).
struct WaveNetPack {
  enum : int64_t { in_w, in_b, conv_w, conv_b, res_skip_w, res_skip_b, out1_w, out1_b, out2_w, out2_b, size };
};
// wavenet_step's `int[] config`: these five, then one dilation per layer (length 5 + L;
// fastar/ops/wavenet.py's WaveNetWeights.config).
struct WaveNetConfig {
  enum : int64_t { num_prime, start, num_steps, num_mixtures, num_bits, dilations };
};

// Everything a wavenet_step kernel needs besides the run state it was handed by name: the
// weights by name, the config's integers, the shape.
struct WaveNetStepArgs {
  at::Tensor in_w, in_b, conv_w, conv_b, res_skip_w, res_skip_b, out1_w, out1_b, out2_w, out2_b;
  std::vector<int64_t> dilations;
  int64_t num_prime, start, num_steps, num_mixtures, num_bits;
  double temperature;
  StepShape s;
};

// Unpacks and checks wavenet_step's arguments: the one place the CPU and the CUDA entry points
// (csrc/cpu/wavenet.cpp, csrc/cuda/wavenet.cu) read pack and config, so both reject bad input
// with the same sentences; each then adds only what its device cannot do.
inline WaveNetStepArgs parse_wavenet_step(const char* op, const at::Tensor& samples, const at::Tensor& queues,
                                          const at::Tensor& position, const at::Tensor& logits,
                                          const at::Tensor& noise, const c10::optional<at::Tensor>& cond,
                                          at::TensorList pack, at::IntArrayRef config, double temperature) {
  TORCH_CHECK(static_cast<int64_t>(pack.size()) == WaveNetPack::size, op, ": pack must hold the ", WaveNetPack::size,
              " weights (in_w, in_b, conv_w, conv_b, res_skip_w, res_skip_b, out1_w, out1_b, out2_w, out2_b), got ",
              pack.size());
  TORCH_CHECK(static_cast<int64_t>(config.size()) >= WaveNetConfig::dilations, op,
              ": config must hold [num_prime, start, num_steps, num_mixtures, num_bits, dilations...], got ",
              config);
  WaveNetStepArgs a;
  a.in_w = pack[WaveNetPack::in_w];
  a.in_b = pack[WaveNetPack::in_b];
  a.conv_w = pack[WaveNetPack::conv_w];
  a.conv_b = pack[WaveNetPack::conv_b];
  a.res_skip_w = pack[WaveNetPack::res_skip_w];
  a.res_skip_b = pack[WaveNetPack::res_skip_b];
  a.out1_w = pack[WaveNetPack::out1_w];
  a.out1_b = pack[WaveNetPack::out1_b];
  a.out2_w = pack[WaveNetPack::out2_w];
  a.out2_b = pack[WaveNetPack::out2_b];
  a.num_prime = config[WaveNetConfig::num_prime];
  a.start = config[WaveNetConfig::start];
  a.num_steps = config[WaveNetConfig::num_steps];
  a.num_mixtures = config[WaveNetConfig::num_mixtures];
  a.num_bits = config[WaveNetConfig::num_bits];
  a.dilations.assign(config.begin() + WaveNetConfig::dilations, config.end());
  a.temperature = temperature;
  const at::IntArrayRef dilations(a.dilations);
  const auto &conv_w = a.conv_w, &res_skip_w = a.res_skip_w, &out2_w = a.out2_w;
  const int64_t num_mixtures = a.num_mixtures, num_bits = a.num_bits, start = a.start;
  StepShape& s = a.s;
  // num_mixtures == 0: softmax head over A codes (samples int64, in_w (A, R), noise (B, T));
  // num_mixtures == K > 0: mixture head, A = 3K params (samples float in the acc dtype holding
  // the previous value, in_w (1, R), noise (B, 2, T): component and logistic uniforms).
  TORCH_CHECK(conv_w.dim() == 4, op, ": conv_w must be 4-D (L, k, R, 2D), got shape ", conv_w.sizes());
  s.L = conv_w.size(0);
  s.k = conv_w.size(1);
  s.R = conv_w.size(2);
  TORCH_CHECK(conv_w.size(3) % 2 == 0 && conv_w.size(3) > 0, op,
              ": conv_w's last dim (2 * dilation channels) must be even and positive, got ", conv_w.size(3));
  s.D = conv_w.size(3) / 2;
  TORCH_CHECK(res_skip_w.dim() == 3 && res_skip_w.size(0) == s.L && res_skip_w.size(1) == s.D &&
                  res_skip_w.size(2) > s.R,
              op, ": res_skip_w must be (L=", s.L, ", D=", s.D, ", R+S with R=", s.R, "), got shape ",
              res_skip_w.sizes());
  s.S = res_skip_w.size(2) - s.R;
  TORCH_CHECK(out2_w.dim() == 2 && out2_w.size(0) == s.S, op, ": out2_w must be (S=", s.S, ", A), got shape ",
              out2_w.sizes());
  s.A = out2_w.size(1);
  auto want = [&](const at::Tensor& t, const char* name, std::vector<int64_t> shape) {
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape ", at::IntArrayRef(shape),
                ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == conv_w.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
                " must match conv_w dtype ", conv_w.scalar_type());
    TORCH_CHECK(t.device() == conv_w.device(), op, ": ", name, " is on ", t.device(), " but conv_w on ",
                conv_w.device());
  };
  TORCH_CHECK(num_mixtures >= 0, op, ": num_mixtures must be 0 (softmax head) or positive, got ", num_mixtures);
  const bool mixture = num_mixtures > 0;
  if (mixture) {
    TORCH_CHECK(s.A == 3 * num_mixtures, op, ": out2_w has ", s.A, " output columns, but num_mixtures=",
                num_mixtures, " needs 3K = ", 3 * num_mixtures, " (K logits, K means, K log-scales)");
    TORCH_CHECK(num_bits >= 1 && num_bits <= 16, op, ": num_bits must be in [1, 16], got ", num_bits);
  }
  want(a.in_w, "in_w", {mixture ? 1 : s.A, s.R});
  want(a.in_b, "in_b", {s.R});
  want(a.conv_b, "conv_b", {s.L, 2 * s.D});
  want(a.res_skip_b, "res_skip_b", {s.L, s.R + s.S});
  want(a.out1_w, "out1_w", {s.S, s.S});
  want(a.out1_b, "out1_b", {s.S});
  want(a.out2_b, "out2_b", {s.A});
  const auto acc = conv_w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto sample_type = mixture ? acc : at::kLong;
  TORCH_CHECK(samples.dim() == 2 && samples.scalar_type() == sample_type, op, ": samples must be a 2-D (B, T) ",
              sample_type, mixture ? " tensor of audio values (mixture head)" : " tensor of codes (softmax head)",
              ", got ", samples.scalar_type(), " of shape ", samples.sizes());
  s.B = samples.size(0);
  s.T = samples.size(1);
  TORCH_CHECK(logits.scalar_type() == acc && logits.dim() == 2 && logits.size(0) == s.B && logits.size(1) == s.A,
              op, ": logits must be a (", s.B, ", ", s.A, ") ", acc, " tensor, got ", logits.scalar_type(),
              " of shape ", logits.sizes());
  TORCH_CHECK(static_cast<int64_t>(dilations.size()) == s.L, op, ": dilations must list ", s.L,
              " ints (one per layer), got ", dilations.size());
  s.Ntot = 0;
  for (auto d : dilations) {
    TORCH_CHECK(d >= 1, op, ": every dilation must be at least 1, got ", dilations);
    s.offsets.push_back(s.Ntot);
    s.Ntot += (s.k - 1) * d;
  }
  TORCH_CHECK(queues.dim() == 3 && queues.size(0) == s.B && queues.size(1) == s.Ntot && queues.size(2) == s.R, op,
              ": queues must have shape [", s.B, ", ", s.Ntot, ", ", s.R,
              "] (batch, sum over layers of (kernel_size - 1) * dilation, residual channels), got ", queues.sizes());
  TORCH_CHECK(queues.scalar_type() == acc, op, ": queues must be ", acc, ", got ", queues.scalar_type());
  TORCH_CHECK(position.scalar_type() == at::kLong && position.numel() == 1, op,
              ": position must be a (1,) int64 tensor, got ", position.scalar_type(), " of shape ",
              position.sizes());
  if (mixture) {
    TORCH_CHECK(noise.dim() == 3 && noise.size(0) == s.B && noise.size(1) == 2 && noise.size(2) == s.T &&
                    noise.scalar_type() == acc,
                op, ": noise must be a (", s.B, ", 2, ", s.T, ") ", acc,
                " tensor of uniforms (component, logistic) for the mixture head, got ", noise.scalar_type(),
                " of shape ", noise.sizes());
  } else {
    TORCH_CHECK(noise.dim() == 2 && noise.size(0) == s.B && noise.size(1) == s.T &&
                    at::isFloatingType(noise.scalar_type()),
                op, ": noise must be a floating (", s.B, ", ", s.T, ") tensor of uniforms, got ", noise.scalar_type(),
                " of shape ", noise.sizes());
  }
  s.Tc = 0;
  if (cond.has_value() && cond->defined()) {
    TORCH_CHECK(cond->dim() == 4 && cond->size(0) == s.B && (cond->size(1) == 1 || cond->size(1) == s.T) &&
                    cond->size(2) == s.L && cond->size(3) == 2 * s.D,
                op, ": cond must have shape [", s.B, ", 1 or ", s.T, ", ", s.L, ", ", 2 * s.D, "], got ",
                cond->sizes());
    TORCH_CHECK(cond->scalar_type() == conv_w.scalar_type(), op, ": cond dtype ", cond->scalar_type(),
                " must match conv_w dtype ", conv_w.scalar_type());
    TORCH_CHECK(cond->device() == conv_w.device(), op, ": cond is on ", cond->device(), " but conv_w on ",
                conv_w.device());
    s.Tc = cond->size(1);
  }
  TORCH_CHECK(mixture || (start >= 0 && start < s.A), op, ": start must be a code in [0, ", s.A, "), got ", start);
  for (const at::Tensor* t : {&samples, &queues, &position, &logits, &noise}) {
    TORCH_CHECK(t->device() == conv_w.device(), op, ": samples, queues, position, logits and noise must be on ",
                conv_w.device(), " with the weights, got one on ", t->device());
  }
  TORCH_CHECK(samples.is_contiguous() && queues.is_contiguous() && logits.is_contiguous(), op,
              ": samples, queues and logits must be contiguous (they are updated in place)");
  TORCH_CHECK(a.num_steps >= 1, op, ": num_steps must be at least 1, got ", a.num_steps);
  TORCH_CHECK(temperature >= 0, op, ": temperature must be non-negative, got ", temperature);
  return a;
}

}  // inline namespace FASTAR_TU_NAMESPACE
}  // namespace fastar
