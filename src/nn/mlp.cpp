// SwiGLU MLP forward/backward, and the inference-only forward into a residual (forward_add).
#include "nn/mlp.h"

#include "nn/linear.h"

namespace moekit {

MLP MLP::create(ParamTable& params, const std::string& prefix, int64_t hidden, int64_t intermediate,
                Device device) {
  MLP m;
  m.gate_proj = params.add_matrix(prefix + ".gate_proj.weight", {intermediate, hidden}, device);
  m.up_proj = params.add_matrix(prefix + ".up_proj.weight", {intermediate, hidden}, device);
  m.down_proj = params.add_matrix(prefix + ".down_proj.weight", {hidden, intermediate}, device);
  return m;
}

namespace {

// The dtype of gate, up and dh (SwiGLU's operands): BF16 under the Bf16 precision, as the routed
// experts keep theirs (nn/moe.cpp's bf16_activations), above the few rows that the GEMV path
// serves: the GEMMs write their products rounded once, and SwiGLU (fp32 math) reads half the
// bytes, which also halves what forward saves for backward (at V2-Lite's dense layer, 2 x 179 MB
// instead of 2 x 358 MB per 8192 tokens). It changes values (SwiGLU sees rounded products), so it
// follows the precision, not round_gemm_inputs_once (nn/linear.h), like the bf16 logits. F32 for
// few rows (decoding: the GEMV path reads F32) and where the backend lacks the BF16 variants.
DType swiglu_operand_dtype(Backend& be, int64_t rows) {
  return be.precision() == Precision::Bf16 && be.supports(Op::Matmul, DType::BF16) &&
                 be.supports(Op::SwiGLU, DType::BF16) && rows > be.unrounded_gemv_rows()
             ? DType::BF16
             : DType::F32;
}

}  // namespace

Tensor MLP::forward(Backend& be, const Tensor& x, Tensor* residual) {
  const int64_t T = x.dim(0), I = intermediate(), H = x.dim(1);
  // Under Bf16 the input is rounded once for the gate and up GEMMs and their weight gradients
  // (nn/linear.h), and SwiGLU writes h in bf16 at once, since only the down GEMMs read it; gate
  // and up, which SwiGLU's backward reads too, in swiglu_operand_dtype.
  saved.x = gemm_input(be, x);
  const DType act = swiglu_operand_dtype(be, T);
  saved.gate = Tensor::empty({T, I}, act, x.device());
  saved.up = Tensor::empty({T, I}, act, x.device());
  // h BF16 also when gate and up are (SwiGLU takes bf16 operands with a bf16 h): the down GEMMs
  // would round an F32 h to the same values.
  const DType h_dtype = act == DType::BF16                     ? DType::BF16
                        : be.supports(Op::SwiGLU, DType::BF16) ? gemm_input_dtype(be, T)
                                                               : DType::F32;
  Tensor h = Tensor::empty({T, I}, h_dtype, x.device());
  be.matmul_pair(saved.gate, saved.up, saved.x, gemm_weight(be, *gate_proj, T),
                 gemm_weight(be, *up_proj, T));  // linear_forward of both in one call
  be.swiglu_forward(h, saved.gate, saved.up);
  // h's one reader in backward is down_proj's weight gradient: kept only when that trains (not
  // for ESFT's frozen shared experts and dense layers).
  saved.h = down_proj->trainable ? h : Tensor();
  if (residual) {
    linear_forward_add(be, *residual, h, *down_proj);
    return *residual;
  }
  Tensor y = Tensor::empty({T, H}, DType::F32, x.device());
  linear_forward(be, y, h, *down_proj);
  return y;
}

void MLP::forward_add(Backend& be, const Tensor& x, Tensor& y) {
  const int64_t T = x.dim(0), I = intermediate();
  Tensor gate = Tensor::empty({T, I}, DType::F32, x.device());
  Tensor up = Tensor::empty({T, I}, DType::F32, x.device());
  Tensor h = Tensor::empty({T, I}, DType::F32, x.device());
  be.matmul_pair(gate, up, x, gemm_weight(be, *gate_proj, T), gemm_weight(be, *up_proj, T));
  be.swiglu_forward(h, gate, up);
  be.matmul(y, h, down_proj->value, false, true, 1.0f, /*beta=*/1.0f);
}

void MLP::backward(Backend& be, Tensor& dx, const Tensor& dy, bool accumulate) {
  const int64_t T = dy.dim(0), I = intermediate();
  // dh feeds only SwiGLU's backward: the down GEMM's product in the forward's operand dtype. Not
  // needed when neither dx nor the gate and up weights' gradients are.
  const bool need_dh = dx.defined() || has_grad(gate_proj) || has_grad(up_proj);
  Tensor dh = need_dh ? Tensor::empty({T, I}, saved.gate.dtype(), dy.device()) : Tensor();
  linear_backward(be, dh, *down_proj, dy, saved.h, false);
  if (!need_dh) return;
  // dgate and dup feed only GEMMs (dx and the weight gradients), which round them under Bf16:
  // SwiGLU's backward writes them rounded, with no F32 copy and no conversion pass.
  const DType d_dtype =
      bf16_gemm_inputs(be) && be.supports(Op::SwiGLU, DType::BF16) ? DType::BF16 : DType::F32;
  Tensor dgate = Tensor::empty({T, I}, d_dtype, dy.device());
  Tensor dup = Tensor::empty({T, I}, d_dtype, dy.device());
  be.swiglu_backward(dgate, dup, dh, saved.gate, saved.up);
  linear_backward(be, dx, *gate_proj, dgate, saved.x, accumulate);
  linear_backward(be, dx, *up_proj, dup, saved.x, true);
}

}  // namespace moekit
