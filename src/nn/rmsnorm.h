// RMSNorm: y = x * rsqrt(mean(x^2) + eps) * weight, in fp32. Saves x and the per-row rstd.
#pragma once

#include "nn/params.h"
#include "ops/ops.h"

namespace moekit {

struct RMSNorm {
  Param* weight = nullptr;
  float eps = 1e-6f;
  struct Saved {
    Tensor x, rstd;
  } saved;

  // y [T,C] from x [T,C].
  Tensor forward(Backend& be, const Tensor& x);
  // dx (= or += when accumulate) from dy; weight.grad += when it trains.
  void backward(Backend& be, Tensor& dx, const Tensor& dy, bool accumulate);
};

}  // namespace moekit
