// RMSNorm forward/backward over the backend ops.
#include "nn/rmsnorm.h"

#include "nn/linear.h"
#include "ops/cpu/cpu_util.h"

namespace moekit {

Tensor RMSNorm::forward(Backend& be, const Tensor& x, DType out_dtype) {
  Tensor y = Tensor::empty(x.shape(), out_dtype, x.device());
  saved.x = x;
  saved.rstd = Tensor::empty({rows(x)}, DType::F32, x.device());
  be.rmsnorm_forward(y, saved.rstd, x, weight->value, eps);
  return y;
}

DType RMSNorm::gemm_output_dtype(Backend& be, int64_t rows) {
  return be.supports(Op::RmsNorm, DType::BF16) ? gemm_input_dtype(be, rows) : DType::F32;
}

void RMSNorm::backward(Backend& be, Tensor& dx, const Tensor& dy, bool accumulate,
                       Tensor* dx_bf16) {
  Tensor* dw = weight->grad.defined() ? &weight->grad : nullptr;
  // The op adds into dx itself (accumulate): no temporary, no separate add pass.
  be.rmsnorm_backward(dx, dx_bf16, dw, dy, saved.x, weight->value, saved.rstd, accumulate);
}

}  // namespace moekit
