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
}
