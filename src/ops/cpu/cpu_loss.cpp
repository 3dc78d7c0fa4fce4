// CPU backend, part 4: softmax cross-entropy over the vocabulary, forward and backward.
#include <algorithm>
#include <cmath>

#include "core/thread_pool.h"
#include "ops/cpu/cpu_backend.h"
#include "ops/cpu/cpu_util.h"

namespace moekit {

void CpuBackend::cross_entropy_forward(Tensor& losses, const Tensor& logits,
                                       const Tensor& targets) {
  const int64_t T = rows(logits), V = cols(logits);
  cpu_pool().parallel_for(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      int32_t y = targets.i32()[t];
      if (y < 0) {
        losses.f32()[t] = 0.0f;
        continue;
      }
      const float* l = logits.f32() + t * V;
      float m = *std::max_element(l, l + V);
      double z = 0.0;  // double sum: 100k float terms in a float sum lose the 1e-5 loss parity
      for (int64_t i = 0; i < V; ++i) z += double(std::exp(l[i] - m));
      losses.f32()[t] = float(std::log(z) + m - l[y]);
    }
  });
}

void CpuBackend::cross_entropy_backward(Tensor& dlogits, const Tensor& logits,
                                        const Tensor& targets, float scale) {
  const int64_t T = rows(logits), V = cols(logits);
  expect_f32_on_cpu("cross_entropy_backward", {&dlogits});
  cpu_pool().parallel_for(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      int32_t y = targets.i32()[t];
      float* d = dlogits.f32() + t * V;
      if (y < 0) {
        std::fill(d, d + V, 0.0f);
        continue;
      }
      const float* l = logits.f32() + t * V;
      float m = *std::max_element(l, l + V);
      double z = 0.0;
      for (int64_t i = 0; i < V; ++i) z += double(d[i] = std::exp(l[i] - m));  // one exp per logit
      const float k = float(double(scale) / z);
      for (int64_t i = 0; i < V; ++i) d[i] *= k;
      d[y] -= scale;
    }
  });
}

}  // namespace moekit
