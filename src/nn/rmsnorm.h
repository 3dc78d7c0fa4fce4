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

  // y [T,C] from x [T,C]. out_dtype BF16 (where the backend supports(RmsNorm, BF16)) gives the
  // fp32 result rounded once as it is written: for an output that only bf16 GEMMs read, which
  // would round it anyway (nn/linear.h, gemm_input_dtype).
  Tensor forward(Backend& be, const Tensor& x, DType out_dtype = DType::F32);
  // The out_dtype for a norm of `rows` rows whose output only GEMMs read: BF16 where gemm_input
  // would round it and the backend's norm writes bf16, else F32 (few rows, other precisions, the
  // CPU, or the round-once switch off).
  static DType gemm_output_dtype(Backend& be, int64_t rows);
  // dx (= or += when accumulate) from dy; weight.grad += when it trains. dx_bf16 (BF16, may be
  // null; where supports(RmsNorm, BF16)) also receives the final dx rounded to bf16.
  void backward(Backend& be, Tensor& dx, const Tensor& dy, bool accumulate,
                Tensor* dx_bf16 = nullptr);
  bool trains() const { return has_grad(weight); }
};

}  // namespace moekit
