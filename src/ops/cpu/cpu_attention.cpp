// CPU backend, part 2: causal attention forward and backward (the reference for the fused GPU
// kernel). Per (sequence, head) the work is three GEMMs over strided views of q/k/v (OpenBLAS,
// threaded) plus a row-parallel masked softmax: scalar dot-product loops ran ~10x slower here.
// Forward keeps only the per-row log-sum-exp; backward recomputes the probabilities from it, so
// nothing of size [S, S] is kept between passes (one [S, S] scratch per call). Decoding's ops live
// here too: the causal softmax over the cache, the greedy argmax, and MLA's latent attention over
// the cache at device-side positions (a reference; per token the GEMMs of the prompt path).
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/error.h"
#include "core/thread_pool.h"
#include "ops/cpu/cpu_backend.h"
#include "ops/cpu/cpu_util.h"

namespace moekit {

namespace {

// P[i, j] = exp(scale * S[i, j] - lse[i]) for j <= i, 0 above the diagonal. When `lse_out` is
// given, lse is computed (forward); otherwise read (backward).
void causal_softmax_lse(float* s, int64_t seq, float scale, float* lse, bool compute_lse) {
  cpu_pool().parallel_for(seq, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float* row = s + i * seq;
      float l;
      if (compute_lse) {
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j <= i; ++j) m = std::max(m, row[j] * scale);
        float z = 0.0f;
        for (int64_t j = 0; j <= i; ++j) z += std::exp(row[j] * scale - m);
        l = m + std::log(z);
        lse[i] = l;
      } else {
        l = lse[i];
      }
      for (int64_t j = 0; j <= i; ++j) row[j] = std::exp(row[j] * scale - l);
      for (int64_t j = i + 1; j < seq; ++j) row[j] = 0.0f;
    }
  });
}

}  // namespace

void CpuBackend::causal_softmax(Tensor& x, int64_t group, int64_t offset) {
  MOEKIT_CHECK(group > 0 && offset >= 0, "causal_softmax: group {}, offset {}", group, offset);
  const int64_t R = rows(x), L = cols(x);
  float* p = x.f32();
  cpu_pool().parallel_for(R, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* s = p + r * L;
      const int64_t n = std::min(L, offset + r / group);
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
      float z = 0.0f;
      for (int64_t j = 0; j < n; ++j) z += (s[j] = std::exp(s[j] - m));
      for (int64_t j = 0; j < L; ++j) s[j] = j < n ? s[j] / z : 0.0f;
    }
  });
}

void CpuBackend::argmax(Tensor& idx, const Tensor& x, int64_t n) {
  MOEKIT_CHECK(idx.numel() == rows(x) && n > 0 && n <= cols(x), "argmax: idx {}, x {}, n {}",
               idx.shape().str(), x.shape().str(), n);
  for (int64_t r = 0; r < rows(x); ++r) {
    const float* row = x.f32() + r * cols(x);
    idx.i32()[r] = int32_t(std::max_element(row, row + n) - row);
  }
}

void CpuBackend::latent_attention(Tensor& ctx, const Tensor& q_lat, const Tensor& q_rope,
                                  const Tensor& kv_latent, const Tensor& k_rope,
                                  const Tensor& positions, int64_t heads, float scale) {
  const auto [n, H, r, dr, cap] =
      latent_attention_dims(ctx, q_lat, q_rope, kv_latent, k_rope, positions, heads);
  const int32_t* pos = positions.i32();
  expect_indices(positions, cap, "latent_attention", "position");
  // Per token, the ops of the prompt path (infer/mla_decode.cpp) over the rows it sees, so both
  // paths round alike: two score GEMMs into [H, seen], the row softmax, one GEMM for the context.
  const Tensor ql = q_lat.reshape({n * H, r}), qr = q_rope.reshape({n * H, dr});
  Tensor out = ctx.reshape({n * H, r});
  for (int64_t i = 0; i < n; ++i) {
    const int64_t seen = int64_t(pos[i]) + 1;
    const Tensor C = kv_latent.slice(0, seen), KR = k_rope.slice(0, seen);
    Tensor scores = Tensor::empty({H, seen}), ctx_i = out.slice(i * H, (i + 1) * H);
    matmul(scores, ql.slice(i * H, (i + 1) * H), C, false, true, scale, 0.0f);
    if (dr > 0) matmul(scores, qr.slice(i * H, (i + 1) * H), KR, false, true, scale, 1.0f);
    causal_softmax(scores, H, seen);  // every row sees all `seen` entries
    matmul(ctx_i, scores, C, false, false, 1.0f, 0.0f);
  }
}

void CpuBackend::attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                                   const Tensor& v, int64_t batch, int64_t seq, int64_t heads,
                                   float scale) {
  expect_f32_on_cpu("attention_forward", {&out, &lse, &q, &k, &v});  // no BF16 out here
  const int64_t dqk = q.numel() / (batch * seq * heads), dv = v.numel() / (batch * seq * heads);
  const int ldqk = int(heads * dqk), ldv = int(heads * dv), S = int(seq);
  std::vector<float> p(static_cast<size_t>(seq * seq));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      const float* qb = q.f32() + (b * seq * heads + h) * dqk;
      const float* kb = k.f32() + (b * seq * heads + h) * dqk;
      const float* vb = v.f32() + (b * seq * heads + h) * dv;
      float* ob = out.f32() + (b * seq * heads + h) * dv;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, S, S, int(dqk), 1.0f, qb, ldqk, kb, ldqk,
                  0.0f, p.data(), S);
      causal_softmax_lse(p.data(), seq, scale, lse.f32() + (b * heads + h) * seq, true);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, S, int(dv), S, 1.0f, p.data(), S, vb,
                  ldv, 0.0f, ob, ldv);
    }
}

void CpuBackend::attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                                    const Tensor& out, const Tensor& lse, const Tensor& q,
                                    const Tensor& k, const Tensor& v, int64_t batch, int64_t seq,
                                    int64_t heads, float scale) {
  expect_f32_on_cpu("attention_backward", {&dq, &dk, &dv, &dout, &out, &lse, &q, &k, &v});
  const int64_t dqk = q.numel() / (batch * seq * heads), dvd = v.numel() / (batch * seq * heads);
  const int ldqk = int(heads * dqk), ldv = int(heads * dvd), S = int(seq);
  std::vector<float> p(static_cast<size_t>(seq * seq)), dp(static_cast<size_t>(seq * seq));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t off_qk = (b * seq * heads + h) * dqk, off_v = (b * seq * heads + h) * dvd;
      const float *qb = q.f32() + off_qk, *kb = k.f32() + off_qk, *vb = v.f32() + off_v;
      const float *dob = dout.f32() + off_v, *ob = out.f32() + off_v;
      // P from the saved log-sum-exp.
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, S, S, int(dqk), 1.0f, qb, ldqk, kb, ldqk,
                  0.0f, p.data(), S);
      causal_softmax_lse(p.data(), seq, scale,
                         const_cast<float*>(lse.f32()) + (b * heads + h) * seq, false);
      // dV = P^T dO;  dP = dO V^T.
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, S, int(dvd), S, 1.0f, p.data(), S, dob,
                  ldv, 0.0f, dv.f32() + off_v, ldv);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, S, S, int(dvd), 1.0f, dob, ldv, vb, ldv,
                  0.0f, dp.data(), S);
      // dS = P * (dP - rowsum(dO * O)) * scale (softmax backward; rowsum(P dP) = dO . O).
      cpu_pool().parallel_for(seq, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) {
          float d = 0.0f;
          for (int64_t c = 0; c < dvd; ++c) d += dob[i * ldv + c] * ob[i * ldv + c];
          float* pr = p.data() + i * seq;
          const float* dpr = dp.data() + i * seq;
          for (int64_t j = 0; j < seq; ++j) pr[j] = pr[j] * (dpr[j] - d) * scale;
        }
      });
      // dQ = dS K;  dK = dS^T Q.
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, S, int(dqk), S, 1.0f, p.data(), S, kb,
                  ldqk, 0.0f, dq.f32() + off_qk, ldqk);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, S, int(dqk), S, 1.0f, p.data(), S, qb,
                  ldqk, 0.0f, dk.f32() + off_qk, ldqk);
    }
}

}  // namespace moekit
