// The one place where fastar's op schemas are defined. Kernels register
// against these names in csrc/cpu/<family>.cpp and csrc/cuda/<family>*.cu, so
// a CPU-only build simply lacks the CUDA registrations.
#include <torch/library.h>

#ifdef FASTAR_PYTHON_MODULE
#include <Python.h>
// fastar._C is an empty Python module: importing it loads this shared library,
// whose static initialisers run the TORCH_LIBRARY registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastar's compiled op library (registrations only)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(fastar, m) {
  // ---- masked convolution family (fastar/ops/masked_conv.py) ----
  // out = conv2d(x, weight * mask, bias, stride=1, padding, dilation); taps
  // whose mask is zero for every (out, in) channel pair cost no work.
  m.def(
      "masked_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor mask, "
      "int[2] padding, int[2] dilation) -> Tensor");
  // Gradients w.r.t. (x, weight, bias); an entry of output_mask that is false
  // yields an empty tensor in that slot instead of the gradient.
  m.def(
      "masked_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mask, "
      "int[2] padding, int[2] dilation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- dilated causal queues (fastar/ops/wavenet.py) ----
  // One decoding step of a dilated causal conv1d: y = bias + sum_j weight[:, :, j] @ x_{t-(k-1-j)d};
  // state (B, C_in, (k-1)*d) is a ring buffer (x_s in slot s mod (k-1)d) updated in place.
  m.def(
      "causal_conv1d_update(Tensor x, Tensor(a!) state, Tensor weight, Tensor? bias, int dilation, "
      "Tensor position) -> Tensor");
  // One generation step of a whole WaveNet (layers, head, sampling), repeated
  // num_steps times; the step index is read from (and incremented in) the device tensor
  // `position`, so it graph-captures. num_mixtures 0: softmax head, int64 codes; K > 0:
  // discretized logistic mixture head (out2 gives 3K params), float samples, noise (B, 2, T).
  // pack: the weights [in_w, in_b, conv_w, conv_b, res_skip_w, res_skip_b, out1_w, out1_b,
  // out2_w, out2_b]; config: [num_prime, start, num_steps, num_mixtures, num_bits, dilation per
  // layer...] (csrc/wavenet.h's WaveNetPack / WaveNetConfig, parse_wavenet_step).
  m.def(
      "wavenet_step(Tensor(a!) samples, Tensor(b!) queues, Tensor(c!) position, Tensor(d!) logits, "
      "Tensor noise, Tensor? cond, Tensor[] pack, int[] config, float temperature) -> ()");

  // ---- mixture / categorical family (fastar/ops/mixture.py; layouts in csrc/mixture.h) ----
  // Per-position NLL (B, N) of x (B, C, N) under the discretized logistic
  // mixture params (B, P, N), P = 3K (C = 1) or 10K (C = 3), openai layout.
  m.def("discretized_mix_logistic_nll(Tensor x, Tensor params, int num_mixtures, int num_bits) -> Tensor");
  // Gradients w.r.t. (x, params) given dL/dnll (B, N) and the forward's nll;
  // a false output_mask entry yields an empty tensor in that slot.
  m.def(
      "discretized_mix_logistic_nll_backward(Tensor grad, Tensor x, Tensor params, Tensor nll, "
      "int num_mixtures, int num_bits, bool[2] output_mask) -> (Tensor, Tensor)");
  // Samples (B, C, N) at the bin centres from uniforms noise (B, 1 + C, N).
  m.def(
      "sample_discretized_mix_logistic(Tensor params, Tensor noise, int num_mixtures, int num_bits, "
      "float temperature) -> Tensor");
  // int64 indices (O, I) from logits (O, K, I) by inverse CDF on noise (O, I);
  // temperature 0 = argmax (noise unused), top_k 0 = no truncation.
  m.def("categorical_sample(Tensor logits, Tensor? noise, float temperature, int top_k) -> Tensor");
  // log P(colour j's bins | the pixel's earlier colours prev (N, j)) (N, 2^num_bits) under the
  // per-pixel mixture params (N, P): the chain-rule factors an entropy coder codes a pixel with.
  m.def("dml_value_log_probs(Tensor params, Tensor prev, int num_mixtures, int j, int num_bits) -> Tensor");

  // ---- masked convolution at one position (cached sampling; fastar/ops/masked_conv_at.py) ----
  // Writes x_new (N, C_in, P) into x_cache (N, C_in, H, W) at the P positions
  // pos (P, 2) = (row, column), then returns (N, C_out, P): the masked
  // convolution's output at those positions only.
  m.def(
      "masked_conv2d_at(Tensor(a!) x_cache, Tensor? x_new, Tensor weight, Tensor? bias, Tensor mask, "
      "Tensor pos, int[2] padding, int[2] dilation) -> Tensor");

  // ---- Gated PixelCNN pixel step (cached sampling; fastar/ops/gated_pixelcnn.py, layouts in csrc/pixel_step.h) ----
  // One whole pixel step for the batch: every block's horizontal stack at the current
  // position (reading/writing row_cache), the head, the draw of sub-pixel t = step[0], the
  // writes into codes, image and logits, and step[0] += 1 (so a graph replay advances).
  // pack: the weights [h_w, h_b, so_w, so_b, head1_w, head1_b, head2_w, head2_b, class_bias?,
  // cond_map?, map_w?]; config: [levels, taps of block 0, taps of the later blocks, residual flag
  // per block...] (csrc/pixel_step.h's GatedPack / GatedConfig, parse_gated_pixelcnn_step).
  m.def(
      "gated_pixelcnn_step(Tensor(a!) image, Tensor(b!) row_cache, Tensor(c!) codes, Tensor(d!) step, "
      "Tensor(e!) logits, Tensor noise, Tensor links, Tensor? prefix, Tensor? given, Tensor?[] pack, int[] config, "
      "float temperature) -> ()");

  // ---- PixelRNN sub-pixel step (cached sampling; fastar/ops/pixelrnn.py, layouts in csrc/pixelrnn_step.h) ----
  // The first layer at the position, every layer's LSTM cell and residual, the head, the draw of
  // sub-pixel t = step[0], the writes into codes, image, logits and the layer states, step[0] += 1.
  m.def(
      "pixelrnn_step(Tensor(a!) image, Tensor(b!) codes, Tensor(c!) step, Tensor(d!) logits, Tensor(e!) hs, "
      "Tensor(f!) cs, Tensor(g!) xrow, Tensor aux, Tensor noise, Tensor? prefix, Tensor? given, Tensor?[] pack, "
      "int[] config, float temperature) -> ()");

  // ---- PixelRNN scans (fastar/ops/lstm_scan.py; layouts in csrc/lstm_scan.h) ----
  // (B, C, H, W) <-> (B, C, H, W + H - 1): row i shifted right by i / read back from column i.
  m.def("skew(Tensor x) -> Tensor");
  m.def("unskew(Tensor y) -> Tensor");
  // Diagonal LSTM over is_map (B, 4h, H, W) (gates i|f|o|g), w_ss (4h, h, 2) taps [above, left],
  // h0/c0 (B, h, H) the states left of column 0. Returns h, c (B, h, H, W) in is_map's dtype and
  // saved (B, 5h, H, W) in the accumulation dtype: activations [i | f | o | g] and c.
  m.def(
      "diagonal_lstm_scan(Tensor is_map, Tensor w_ss, Tensor? bias, Tensor? h0, Tensor? c0) "
      "-> (Tensor, Tensor, Tensor)");
  // Gradients w.r.t. (is_map, w_ss, bias, h0, c0) from dL/dh, dL/dc (B, h, H, W); a false
  // output_mask entry yields an empty tensor in that slot.
  m.def(
      "diagonal_lstm_scan_backward(Tensor grad_h, Tensor grad_c, Tensor is_map, Tensor w_ss, Tensor h, "
      "Tensor c, Tensor saved, Tensor? h0, Tensor? c0, bool[5] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Row LSTM: w_ss (4h, h, k), k odd, a width-k conv over the previous row's states; the cell
  // comes from above. Outputs as diagonal_lstm_scan.
  // save=False: no gradient will be asked for (inference, sampling): the CPU kernel then writes no
  // saved activations (saved is empty); the CUDA kernel writes them either way.
  m.def("row_lstm_scan(Tensor is_map, Tensor w_ss, Tensor? bias, bool save=True) -> (Tensor, Tensor, Tensor)");
  m.def(
      "row_lstm_scan_backward(Tensor grad_h, Tensor grad_c, Tensor is_map, Tensor w_ss, Tensor h, "
      "Tensor c, Tensor saved, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- PixelCNN++ ----
  // Every ul-stream entry final at pixel (i, j) over three resolutions, and the output layer, as a
  // program over padded maps (fastar/ops/pixelcnnpp.py): mutates maps and out. CPU only.
  m.def(
      "pixelcnnpp_ul_step(Tensor(a!)[] maps, Tensor[] weights, int[] program, int i, int j, Tensor(b!) out) "
      "-> ()");

  // ---- MADE's degree-bucket sampler (fastar/ops/made.py; layouts in csrc/made.h) ----
  // num_steps steps of a MADE (K mask components sharing one ordering) from t = position[0], each
  // hidden unit computed once, when its degree's inputs are drawn; the draw from noise[t] inside
  // (given values kept); codes, hidden, acc, logw, params mutated, position += num_steps.
  // pack: [Wt_1, ..., Wt_L, out_wt, direct_t?] (transposed masked weights, units sorted by degree);
  // config: [levels, num_steps, direct, H_1..H_L].
  m.def(
      "made_sample_steps(Tensor(a!) codes, Tensor(b!) hidden, Tensor(c!) acc, Tensor(d!) logw, "
      "Tensor(e!) position, Tensor(f!) params, Tensor noise, Tensor? given, Tensor? given_mask, Tensor counts, "
      "Tensor[] pack, int[] config, float temperature) -> ()");

  // ---- diagnostics ----
  // The CPU WaveNet step's stage profile (csrc/cpu/wavenet.cpp): no tensor argument, so its one
  // kernel registers as CompositeImplicitAutograd, the kernel an op with an empty dispatch key set runs.
  m.def("_wavenet_profile(bool enable) -> float[]");
}
