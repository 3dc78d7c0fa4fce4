// CPU backend, optimizer ops: the AdamW update of one parameter and the sum of squares behind
// global-norm gradient clipping (the loops that train/adamw.cpp ran before they became ops).
#include <cmath>

#include "core/error.h"
#include "core/thread_pool.h"
#include "ops/cpu/cpu_backend.h"

namespace moekit {

void CpuBackend::adamw_step(Tensor& w, Tensor& m, Tensor& v, const Tensor& g, const AdamWStep& s,
                            Tensor* w_bf16) {
  const int64_t n = w.numel();
  MOEKIT_CHECK(m.numel() == n && v.numel() == n && g.numel() == n,
               "adamw_step: w {} m {} v {} g {}", w.shape().str(), m.shape().str(), v.shape().str(),
               g.shape().str());
  MOEKIT_CHECK(!w_bf16 || (w_bf16->dtype() == DType::BF16 && w_bf16->numel() == n),
               "adamw_step: the bf16 copy of w {} must be BF16 of {} elements", w.shape().str(), n);
  float *pw = w.f32(), *pm = m.f32(), *pv = v.f32();
  uint16_t* pw16 = w_bf16 ? static_cast<uint16_t*>(w_bf16->raw()) : nullptr;
  const float* pg = g.f32();
  cpu_pool().parallel_for(
      n,
      [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          pm[i] = s.beta1 * pm[i] + (1.0f - s.beta1) * pg[i];
          pv[i] = s.beta2 * pv[i] + (1.0f - s.beta2) * pg[i] * pg[i];
          pw[i] -= s.decay * pw[i];  // decoupled decay
          pw[i] -= s.step_size * pm[i] / (std::sqrt(pv[i] * s.inv_bc2) + s.eps);
          if (pw16) pw16[i] = f32_to_bf16(pw[i]);
        }
      },
      1 << 14);
}

double CpuBackend::sum_squares(const Tensor& x) {
  const float* p = x.f32();
  double sq = 0.0;
  for (int64_t i = 0; i < x.numel(); ++i) sq += double(p[i]) * double(p[i]);
  return sq;
}

}  // namespace moekit
