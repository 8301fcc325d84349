// The one accumulator-type rule of every kernel: float for half, bfloat16 and float, double
// for double (the dtype the Python side calls the "acc dtype" and hands uniforms in).
#pragma once
#include <ATen/ATen.h>

namespace fastar {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

inline at::ScalarType acc_type_of(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace fastar
