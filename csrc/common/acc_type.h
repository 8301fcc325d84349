// The one accumulator-type rule of every kernel, CPU and CUDA: float for half, bfloat16 and float,
// double for double (the dtype the Python side calls the "acc dtype" and hands uniforms in).
// For these four dtypes it is exactly ATen's at::opmath_type (checked below), so a kernel may
// mix with ATen's own code without a conversion; the CUDA files use acc_t, not opmath_type, so
// there is one rule to read and to change.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <type_traits>
#include "common/macros.h"

namespace fastar {
inline namespace FASTAR_TU_NAMESPACE {  // see common/macros.h

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

static_assert(std::is_same_v<acc_t<float>, at::opmath_type<float>> &&
                  std::is_same_v<acc_t<double>, at::opmath_type<double>> &&
                  std::is_same_v<acc_t<at::Half>, at::opmath_type<at::Half>> &&
                  std::is_same_v<acc_t<at::BFloat16>, at::opmath_type<at::BFloat16>>,
              "acc_t must stay ATen's opmath_type for every dtype the kernels take");

}  // inline namespace FASTAR_TU_NAMESPACE
}  // namespace fastar
