// CPU backend, part 2: causal attention forward and backward (the reference for the fused GPU
// kernel). One task per (sequence, head): it owns that head's rows of out/dq/dk/dv, so no two
// threads write the same memory and the summation order is fixed.
// Forward keeps only the per-row log-sum-exp; backward recomputes probabilities from it
// (flash-attention style), so no [S, S] matrix is stored between passes.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/thread_pool.h"
#include "ops/cpu/cpu_backend.h"

namespace moekit {

namespace {
// Four partial sums: lets the compiler keep four independent FMA chains (no -ffast-math needed).
inline float dot(const float* a, const float* b, int64_t n) {
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}
inline void axpy(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}
}  // namespace

void CpuBackend::attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                                   const Tensor& v, int64_t batch, int64_t seq, int64_t heads,
                                   float scale) {
  const int64_t dqk = q.numel() / (batch * seq * heads), dv = v.numel() / (batch * seq * heads);
  cpu_pool().parallel_for(batch * heads, [&](int64_t b0, int64_t e0) {
    std::vector<float> p(static_cast<size_t>(seq));
    for (int64_t bh = b0; bh < e0; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      auto row = [&](int64_t s) { return (b * seq + s) * heads + h; };
      for (int64_t i = 0; i < seq; ++i) {
        const float* qi = q.f32() + row(i) * dqk;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j <= i; ++j) {
          p[size_t(j)] = scale * dot(qi, k.f32() + row(j) * dqk, dqk);
          m = std::max(m, p[size_t(j)]);
        }
        float l = 0.0f;
        for (int64_t j = 0; j <= i; ++j) l += (p[size_t(j)] = std::exp(p[size_t(j)] - m));
        float* o = out.f32() + row(i) * dv;
        std::memset(o, 0, size_t(dv) * 4);
        for (int64_t j = 0; j <= i; ++j) axpy(o, p[size_t(j)] / l, v.f32() + row(j) * dv, dv);
        lse.f32()[bh * seq + i] = m + std::log(l);
      }
    }
  });
}

void CpuBackend::attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                                    const Tensor& out, const Tensor& lse, const Tensor& q,
                                    const Tensor& k, const Tensor& v, int64_t batch, int64_t seq,
                                    int64_t heads, float scale) {
  const int64_t dqk = q.numel() / (batch * seq * heads), dvd = v.numel() / (batch * seq * heads);
  cpu_pool().parallel_for(batch * heads, [&](int64_t b0, int64_t e0) {
    for (int64_t bh = b0; bh < e0; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      auto row = [&](int64_t s) { return (b * seq + s) * heads + h; };
      for (int64_t s = 0; s < seq; ++s) {
        std::memset(dq.f32() + row(s) * dqk, 0, size_t(dqk) * 4);
        std::memset(dk.f32() + row(s) * dqk, 0, size_t(dqk) * 4);
        std::memset(dv.f32() + row(s) * dvd, 0, size_t(dvd) * 4);
      }
      for (int64_t i = 0; i < seq; ++i) {
        const float* qi = q.f32() + row(i) * dqk;
        const float* doi = dout.f32() + row(i) * dvd;
        const float di = dot(doi, out.f32() + row(i) * dvd, dvd);  // sum_j p_ij dp_ij
        const float li = lse.f32()[bh * seq + i];
        float* dqi = dq.f32() + row(i) * dqk;
        for (int64_t j = 0; j <= i; ++j) {
          const float* kj = k.f32() + row(j) * dqk;
          float p = std::exp(scale * dot(qi, kj, dqk) - li);
          float dp = dot(doi, v.f32() + row(j) * dvd, dvd);
          float ds = p * (dp - di) * scale;
          axpy(dqi, ds, kj, dqk);
          axpy(dk.f32() + row(j) * dqk, ds, qi, dqk);
          axpy(dv.f32() + row(j) * dvd, p, doi, dvd);
        }
      }
    }
  });
}

}  // namespace moekit
