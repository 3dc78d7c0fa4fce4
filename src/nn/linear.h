// Bias-free linear layer as two free functions (all DeepSeek projections have no bias):
// y[T,N] = x[T,K] @ W[N,K]^T. Backward skips the weight-gradient GEMM for a frozen weight.
#pragma once

#include "nn/params.h"
#include "ops/ops.h"

namespace moekit {

inline void linear_forward(Backend& be, Tensor& y, const Tensor& x, const Param& w) {
  be.matmul(y, x, w.value, false, true, 1.0f, 0.0f);
}

// dx = (or +=, when accumulate) dy @ W; W.grad += dy^T @ x when W trains.
inline void linear_backward(Backend& be, Tensor& dx, Param& w, const Tensor& dy, const Tensor& x,
                            bool accumulate) {
  if (dx.defined()) be.matmul(dx, dy, w.value, false, false, 1.0f, accumulate ? 1.0f : 0.0f);
  if (w.grad.defined()) be.matmul(w.grad, dy, x, true, false, 1.0f, 1.0f);
}

}  // namespace moekit
