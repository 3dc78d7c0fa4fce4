// RMSNorm forward/backward over the backend ops.
#include "nn/rmsnorm.h"

#include "ops/cpu/cpu_util.h"

namespace moekit {

Tensor RMSNorm::forward(Backend& be, const Tensor& x) {
  Tensor y = Tensor::empty(x.shape(), DType::F32, x.device());
  saved.x = x;
  saved.rstd = Tensor::empty({rows(x)}, DType::F32, x.device());
  be.rmsnorm_forward(y, saved.rstd, x, weight->value, eps);
  return y;
}

void RMSNorm::backward(Backend& be, Tensor& dx, const Tensor& dy, bool accumulate) {
  Tensor* dw = weight->grad.defined() ? &weight->grad : nullptr;
  if (!accumulate) {
    be.rmsnorm_backward(dx, dw, dy, saved.x, weight->value, saved.rstd);
    return;
  }
  Tensor tmp = Tensor::empty(dx.shape(), DType::F32, dx.device());
  be.rmsnorm_backward(tmp, dw, dy, saved.x, weight->value, saved.rstd);
  be.add(dx, tmp, 1.0f);
}

}  // namespace moekit
