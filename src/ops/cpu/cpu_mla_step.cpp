// CPU backend, part 6: the fused ops of MLA's decode step (ops.h: mla_cache_write,
// mla_absorb_query, mla_value_heads). The reference for the CUDA kernels, so plain loops in the
// order the ops they replace use: the cache write computes the RMSNorm of kv_a_layernorm and the
// rotation exactly as rmsnorm_forward and rope do; the two weight products sum in index order.
// Tokens (or token-head rows) are split over the thread pool, each output row written by one
// thread, so results do not depend on timing.
#include <cmath>

#include "core/error.h"
#include "core/thread_pool.h"
#include "ops/cpu/cpu_backend.h"
#include "ops/cpu/cpu_util.h"

namespace moekit {

namespace {

// The rotation of a dr-wide rope part at row `pos` of the tables.
void rotate_at(float* out, const float* in, int64_t dr, const Tensor& cos, const Tensor& sin,
               int64_t pos) {
  rotate_pairs(out, in, dr / 2, cos.f32() + pos * (dr / 2), sin.f32() + pos * (dr / 2));
}

}  // namespace

void CpuBackend::mla_cache_write(Tensor& kv_latent, Tensor& k_rope, const Tensor& kv_a,
                                 const Tensor& norm_w, float eps, const Tensor& cos,
                                 const Tensor& sin, const Tensor& positions) {
  const char* op = "mla_cache_write";
  const MlaStepDims d = mla_cache_write_dims(kv_latent, k_rope, kv_a, norm_w, cos, sin, positions);
  expect_f32_on_cpu(op, {&kv_latent, &k_rope, &kv_a, &norm_w, &cos, &sin});
  expect_indices(positions, d.limit, op, "position");
  const int64_t r = d.r, dr = d.dr;
  const float* w = norm_w.f32();
  cpu_pool().parallel_for(d.n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t pos = positions.i32()[i];
      const float* c_kv = kv_a.f32() + i * (r + dr);
      // kv_latent = kv_a_layernorm(c_kv), as rmsnorm_forward.
      float ss = 0.0f;
      for (int64_t c = 0; c < r; ++c) ss += c_kv[c] * c_kv[c];
      const float rstd = 1.0f / std::sqrt(ss / float(r) + eps);
      float* lat = kv_latent.f32() + pos * r;
      for (int64_t c = 0; c < r; ++c) lat[c] = w[c] * (c_kv[c] * rstd);
      // The shared rope key, rotated at the token's position.
      rotate_at(k_rope.f32() + pos * dr, c_kv + r, dr, cos, sin, pos);
    }
  });
}

void CpuBackend::mla_absorb_query(Tensor& q_lat, Tensor& q_rope, const Tensor& q,
                                  const Tensor& kv_b, const Tensor& cos, const Tensor& sin,
                                  const Tensor& positions, int64_t heads, int64_t dn, int64_t dr,
                                  int64_t dv) {
  const char* op = "mla_absorb_query";
  const MlaStepDims d =
      mla_absorb_query_dims(q_lat, q_rope, q, kv_b, cos, sin, positions, heads, dn, dr, dv);
  expect_f32_on_cpu(op, {&q_lat, &q_rope, &q, &kv_b, &cos, &sin});
  expect_indices(positions, d.limit, op, "position");
  const int64_t H = heads, r = d.r, dqk = dn + dr;
  cpu_pool().parallel_for(d.n * H, [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t i = row / H, h = row % H;
      const float* qh = q.f32() + i * H * dqk + h * dqk;  // [q_nope | q_pe] of head h
      rotate_at(q_rope.f32() + row * dr, qh + dn, dr, cos, sin, positions.i32()[i]);
      // q_lat = W_kb_h^T q_nope: the rows of W_kb_h weighted by q_nope, d in order.
      float* out = q_lat.f32() + row * r;
      for (int64_t c = 0; c < r; ++c) out[c] = 0.0f;
      for (int64_t dd = 0; dd < dn; ++dd) {
        const float qd = qh[dd];
        const float* w = kv_b.f32() + (h * (dn + dv) + dd) * r;
        for (int64_t c = 0; c < r; ++c) out[c] += qd * w[c];
      }
    }
  });
}

void CpuBackend::mla_value_heads(Tensor& o, const Tensor& ctx, const Tensor& kv_b, int64_t heads,
                                 int64_t dn, int64_t dv) {
  const char* op = "mla_value_heads";
  const MlaStepDims d = mla_value_heads_dims(o, ctx, kv_b, heads, dn, dv);
  expect_f32_on_cpu(op, {&o, &ctx, &kv_b});
  const int64_t H = heads, r = d.r;
  cpu_pool().parallel_for(d.n * H, [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t i = row / H, h = row % H;
      const float* x = ctx.f32() + row * r;
      for (int64_t j = 0; j < dv; ++j) {  // o_h = W_vb_h ctx_h, one dot per value dim
        const float* w = kv_b.f32() + (h * (dn + dv) + dn + j) * r;
        float s = 0.0f;
        for (int64_t c = 0; c < r; ++c) s += x[c] * w[c];
        o.f32()[i * H * dv + h * dv + j] = s;
      }
    }
  });
}

}  // namespace moekit
