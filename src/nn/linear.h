// Bias-free linear layer as two free functions (all DeepSeek projections have no bias):
// y[T,N] = x[T,K] @ W[N,K]^T. Backward skips the weight-gradient GEMM for a frozen weight.
//
// Rounding GEMM inputs once (Precision::Bf16). Under Bf16 every GEMM rounds each F32 operand to
// bf16 in a conversion pass of its own, so an activation read by several GEMMs (the normed hidden
// state by MLA's q and kv_a projections; an input by its forward GEMM and again by the backward's
// weight gradient; a gradient by dx and dW) used to be rounded once per GEMM. Instead, a layer
// passes its GEMM inputs through gemm_input: under Bf16 that makes the BF16 copy once, every GEMM
// reads it as it is, and the layer saves it for backward in place of the F32 tensor when nothing
// else reads that (half the bytes). A bf16 GEMM of the copy multiplies exactly the values it would
// have rounded itself, so results are bit-identical; in any other precision (the CPU, Fp32, Tf32)
// gemm_input returns its argument and nothing changes.
#pragma once

#include <atomic>

#include "nn/params.h"
#include "ops/ops.h"

namespace moekit {

// Process-wide switch, on by default. Off, layers leave every F32 operand to each GEMM to round,
// as before this mechanism (the same bits, more conversion passes, fp32 copies saved): for the
// test that checks the two agree to the bit, and for A/B measurements.
inline std::atomic<bool>& round_gemm_inputs_once() {
  static std::atomic<bool> on{true};
  return on;
}

// Whether layers round GEMM inputs to bf16 themselves: Precision::Bf16 on a backend whose GEMMs
// take BF16 operands and that has round_bf16 (and the switch above on).
inline bool bf16_gemm_inputs(Backend& be) {
  return be.precision() == Precision::Bf16 && round_gemm_inputs_once() &&
         be.supports(Op::Matmul, DType::BF16) && be.supports(Op::RoundBf16, DType::BF16);
}

// t as every bf16 GEMM reads it: a BF16 copy when bf16_gemm_inputs and t is F32, else t itself.
// For tensors that no GEMM reads unrounded: gradients (dx and dW GEMMs always round) and any
// operand of a weight gradient.
inline Tensor bf16_operand(Backend& be, const Tensor& t) {
  if (t.dtype() != DType::F32 || !bf16_gemm_inputs(be)) return t;
  Tensor out = Tensor::empty(t.shape(), DType::BF16, t.device());
  be.round_bf16(out, t);
  return out;
}

// Whether gemm_input rounds an activation of `rows` rows: a forward GEMM of at most
// unrounded_gemv_rows() rows (decoding) reads its F32 input unrounded, so those stay F32.
inline bool rounds_gemm_input(Backend& be, int64_t rows) {
  return bf16_gemm_inputs(be) && rows > be.unrounded_gemv_rows();
}

// A layer input x [T, K] to pass to every linear_forward that reads it and to save for the
// weight gradient's linear_backward: bf16_operand, except for few-row inputs (rounds_gemm_input).
inline Tensor gemm_input(Backend& be, const Tensor& x) {
  return x.dim(0) > be.unrounded_gemv_rows() ? bf16_operand(be, x) : x;
}

// The dtype for an activation that a layer computes only to feed GEMMs (SwiGLU's h): BF16 where
// gemm_input would round it, so the op producing it writes the rounded values at once.
inline DType gemm_input_dtype(Backend& be, int64_t rows) {
  return rounds_gemm_input(be, rows) ? DType::BF16 : DType::F32;
}

// What a GEMM of `rows` rows reads for weight w: its bf16 copy (Param::gemm_copy) where that GEMM
// would round an F32 weight to the same values anyway (rounds_gemm_input), else the value (the
// GEMV path of few rows reads an fp32 master unrounded).
inline const Tensor& gemm_weight(Backend& be, const Param& w, int64_t rows) {
  return w.gemm_copy.defined() && rounds_gemm_input(be, rows) ? w.gemm_copy : w.value;
}

inline void linear_forward(Backend& be, Tensor& y, const Tensor& x, const Param& w) {
  be.matmul(y, x, gemm_weight(be, w, x.dim(0)), false, true, 1.0f, 0.0f);
}

// y += x @ W^T in the GEMM itself (beta = 1): a residual stream takes a sublayer's output with no
// output tensor and no add pass (y F32).
inline void linear_forward_add(Backend& be, Tensor& y, const Tensor& x, const Param& w) {
  be.matmul(y, x, gemm_weight(be, w, x.dim(0)), false, true, 1.0f, 1.0f);
}

// dx = (or +=, when accumulate) dy @ W; W.grad += dy^T @ x when W trains. x may be the BF16 copy
// gemm_input made in forward. A dy that feeds both GEMMs is rounded once for both.
inline void linear_backward(Backend& be, Tensor& dx, Param& w, const Tensor& dy, const Tensor& x,
                            bool accumulate) {
  const bool both = dx.defined() && w.grad.defined();
  const Tensor g = both ? bf16_operand(be, dy) : dy;
  if (dx.defined())
    be.matmul(dx, g, gemm_weight(be, w, dy.dim(0)), false, false, 1.0f, accumulate ? 1.0f : 0.0f);
  if (w.grad.defined()) be.matmul(w.grad, g, x, true, false, 1.0f, 1.0f);
}

}  // namespace moekit
