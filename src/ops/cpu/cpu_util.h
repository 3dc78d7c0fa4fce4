// Small helpers shared by the CPU kernels: any tensor seen as 2-D [rows, last dim]; the fp32-only
// dtype check.
#pragma once

#include <initializer_list>

#include "core/error.h"
#include "core/tensor.h"

namespace moekit {

inline int64_t cols(const Tensor& t) {
  return t.ndim() == 0 ? 1 : t.dim(-1);
}
inline int64_t rows(const Tensor& t) {
  int64_t c = cols(t);
  return c == 0 ? 0 : t.numel() / c;
}

// The CPU backend computes on F32 tensors only (Backend::supports says no to anything else): a
// one-line error naming the op for an operand of another dtype (the bf16 activation variants of
// the MoE ops exist on CUDA only). Null and undefined tensors are skipped.
inline void expect_f32_on_cpu(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t && t->defined() && t->dtype() != DType::F32)
      fail(
          "CPU {}: {} operand (the CPU backend computes in fp32 only; bf16 activations need the "
          "CUDA backend)",
          op, dtype_name(t->dtype()));
}

}  // namespace moekit
