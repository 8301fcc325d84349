// Data pointers of optional tensor arguments, shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "common/macros.h"

namespace fastar {
inline namespace FASTAR_TU_NAMESPACE {  // see common/macros.h

// The data pointer of an optional tensor argument (a schema's `Tensor?`), or nullptr when it is
// absent or undefined, so a kernel tests one pointer instead of carrying a flag beside it.
template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

// The same for a tensor that may be undefined (an optional argument already made contiguous).
template <typename T>
const T* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // inline namespace FASTAR_TU_NAMESPACE
}  // namespace fastar
