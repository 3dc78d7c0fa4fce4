// Small shape helpers shared by the CPU kernels: any tensor seen as 2-D [rows, last dim].
#pragma once

#include "core/tensor.h"

namespace moekit {

inline int64_t cols(const Tensor& t) {
  return t.ndim() == 0 ? 1 : t.dim(-1);
}
inline int64_t rows(const Tensor& t) {
  int64_t c = cols(t);
  return c == 0 ? 0 : t.numel() / c;
}

}  // namespace moekit
