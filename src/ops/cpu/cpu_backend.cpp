// CPU backend, part 1: memory, GEMM (OpenBLAS), elementwise ops, RMSNorm, SwiGLU, RoPE and the
// row and column copies MLA needs. Loops split rows over the thread pool; each output row is
// written by one thread, so results do not depend on timing.
#include "ops/cpu/cpu_backend.h"

#include <cblas.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "core/thread_pool.h"
#include "ops/cpu/cpu_util.h"

namespace moekit {

bool CpuBackend::supports(Op op, DType dtype) const {
  // round_bf16 and rope's BF16 out are the only BF16 results here: exact, the references for the
  // GPU's (no layer asks for them on the CPU, whose precision is always Fp32). I32: gather_rows
  // moves index tensors too (no arithmetic).
  return dtype == DType::F32 || ((op == Op::RoundBf16 || op == Op::Rope) && dtype == DType::BF16) ||
         (op == Op::GatherRows && dtype == DType::I32);
}

std::shared_ptr<Storage> CpuBackend::allocate(size_t bytes) {
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
  if (!p) fail("out of host memory allocating {} bytes", bytes);
  return std::make_shared<Storage>(p, bytes, Device::CPU, [](void* q) { std::free(q); });
}

void CpuBackend::copy(Tensor& dst, const Tensor& src) {
  std::memcpy(dst.raw(), src.raw(), dst.nbytes());
}

void CpuBackend::fill(Tensor& t, float value) {
  t.fill(value);
}

void CpuBackend::memory_info(size_t& free_bytes, size_t& total_bytes) {
  const auto page = size_t(::sysconf(_SC_PAGESIZE));
  free_bytes = size_t(::sysconf(_SC_AVPHYS_PAGES)) * page;
  total_bytes = size_t(::sysconf(_SC_PHYS_PAGES)) * page;
}

void CpuBackend::matmul(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b,
                        float alpha, float beta) {
  const auto [M, N, K] = matmul_dims(c, a, b, trans_a, trans_b);
  expect_f32_on_cpu("matmul", {&c, &a, &b});
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (beta == 0.0f)
      c.fill(0.0f);
    else
      scale(c, beta);
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, int(M), int(N), int(K), alpha, a.f32(),
              int(cols(a)), b.f32(), int(cols(b)), beta, c.f32(), int(N));
}

void CpuBackend::grouped_matmul(Tensor& c, const Tensor& a, std::span<const Tensor* const> b,
                                std::span<const int64_t> begin, bool trans_b, float beta) {
  grouped_matmul_dims(c, a, b, begin, trans_b);
  expect_f32_on_cpu("grouped_matmul", {&c, &a});
  for (const Tensor* w : b) expect_f32_on_cpu("grouped_matmul", {w});
  // The reference: one GEMM per group on its row block (the per-expert loop it replaces).
  for (size_t g = 0; g < b.size(); ++g) {
    if (begin[g] == begin[g + 1]) continue;
    Tensor cg = c.slice(begin[g], begin[g + 1]);
    matmul(cg, a.slice(begin[g], begin[g + 1]), *b[g], false, trans_b, 1.0f, beta);
  }
}

void CpuBackend::matmul_batched(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a,
                                bool trans_b, float alpha, float beta, const GemmBatch& g) {
  check_gemm_batch(c, a, b, trans_a, trans_b, g);
  if (g.m == 0 || g.n == 0) return;
  for (int64_t i = 0; i < g.count; ++i) {
    float* ci = c.f32() + i * g.stride_c;
    if (g.k == 0) {  // as matmul: c = beta * c
      for (int64_t r = 0; r < g.m; ++r)
        for (int64_t j = 0; j < g.n; ++j)
          ci[r * g.ldc + j] = beta == 0.0f ? 0.0f : beta * ci[r * g.ldc + j];
      continue;
    }
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, int(g.m), int(g.n), int(g.k), alpha,
                a.f32() + i * g.stride_a, int(g.lda), b.f32() + i * g.stride_b, int(g.ldb), beta,
                ci, int(g.ldc));
  }
}

void CpuBackend::round_bf16(Tensor& out, const Tensor& x) {
  MOEKIT_CHECK(out.numel() == x.numel(), "round_bf16: {} vs {}", out.shape().str(),
               x.shape().str());
  expect_f32_on_cpu("round_bf16", {&x});
  if (out.dtype() != DType::BF16)
    fail("CPU round_bf16: out is {}, not BF16", dtype_name(out.dtype()));
  const float* px = x.f32();
  auto* po = static_cast<uint16_t*>(out.raw());
  cpu_pool().parallel_for(
      x.numel(),
      [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) po[i] = f32_to_bf16(px[i]);
      },
      1 << 14);
}

void CpuBackend::add(Tensor& y, const Tensor& x, float alpha) {
  MOEKIT_CHECK(y.numel() == x.numel(), "add: {} vs {}", y.shape().str(), x.shape().str());
  float* py = y.f32();
  const float* px = x.f32();
  cpu_pool().parallel_for(
      y.numel(),
      [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) py[i] += alpha * px[i];
      },
      1 << 14);
}

void CpuBackend::scale(Tensor& y, float alpha) {
  float* py = y.f32();
  cpu_pool().parallel_for(
      y.numel(),
      [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) py[i] *= alpha;
      },
      1 << 14);
}

void CpuBackend::embedding_forward(Tensor& out, const Tensor& table, const Tensor& ids) {
  // bf16 tables exist only on the GPU (--dtype bf16 needs --device cuda); say so, not just "F32".
  if (table.dtype() != DType::F32)
    fail(
        "embedding_forward: {} table on the CPU (the CPU backend reads F32 tables only; bf16 "
        "weights need --device cuda)",
        dtype_name(table.dtype()));
  const int64_t T = ids.numel(), C = cols(table), V = rows(table);
  const int32_t* id = ids.i32();
  for (int64_t t = 0; t < T; ++t)
    MOEKIT_CHECK(id[t] >= 0 && id[t] < V, "token id {} out of range [0, {})", id[t], V);
  cpu_pool().parallel_for(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      std::memcpy(out.f32() + t * C, table.f32() + int64_t(id[t]) * C, size_t(C) * 4);
  });
}

void CpuBackend::embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) {
  // Serial over tokens: a repeated id must accumulate in a fixed order (determinism).
  const int64_t T = ids.numel(), C = cols(dtable);
  const int32_t* id = ids.i32();
  for (int64_t t = 0; t < T; ++t) {
    float* d = dtable.f32() + int64_t(id[t]) * C;
    const float* g = dout.f32() + t * C;
    for (int64_t c = 0; c < C; ++c) d[c] += g[c];
  }
}

void CpuBackend::rmsnorm_forward(Tensor& out, Tensor& rstd, const Tensor& x, const Tensor& w,
                                 float eps) {
  expect_f32_on_cpu("rmsnorm_forward", {&out, &rstd, &x, &w});  // no BF16 out here
  const int64_t T = rows(x), C = cols(x);
  cpu_pool().parallel_for(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* xr = x.f32() + t * C;
      float ss = 0.0f;
      for (int64_t c = 0; c < C; ++c) ss += xr[c] * xr[c];
      float r = 1.0f / std::sqrt(ss / float(C) + eps);
      rstd.f32()[t] = r;
      float* o = out.f32() + t * C;
      for (int64_t c = 0; c < C; ++c) o[c] = w.f32()[c] * (xr[c] * r);
    }
  });
}

void CpuBackend::rmsnorm_backward(Tensor& dx, Tensor* dx_bf16, Tensor* dw, const Tensor& dout,
                                  const Tensor& x, const Tensor& w, const Tensor& rstd,
                                  bool accumulate) {
  if (dx_bf16 && dx_bf16->defined())
    fail(
        "CPU rmsnorm_backward: a dx_bf16 copy was asked for (the CPU backend computes in fp32 "
        "only; bf16 activations need the CUDA backend)");
  expect_f32_on_cpu("rmsnorm_backward", {&dx, dw, &dout, &x, &w, &rstd});
  // y = w * x * r, r = (mean x^2 + eps)^-1/2:  dx = r * (w*dy) - x * r^3 / C * sum(w*dy*x).
  const int64_t T = rows(x), C = cols(x);
  cpu_pool().parallel_for(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* xr = x.f32() + t * C;
      const float* g = dout.f32() + t * C;
      float r = rstd.f32()[t], dot = 0.0f;
      for (int64_t c = 0; c < C; ++c) dot += w.f32()[c] * g[c] * xr[c];
      float k = dot * r * r * r / float(C);
      float* d = dx.f32() + t * C;
      for (int64_t c = 0; c < C; ++c) {
        const float v = r * w.f32()[c] * g[c] - k * xr[c];
        d[c] = accumulate ? d[c] + v : v;
      }
    }
  });
  if (dw) {
    // Columns split over threads; each column sums its tokens in order.
    cpu_pool().parallel_for(C, [&](int64_t b, int64_t e) {
      for (int64_t t = 0; t < T; ++t) {
        const float* xr = x.f32() + t * C;
        const float* g = dout.f32() + t * C;
        float r = rstd.f32()[t];
        for (int64_t c = b; c < e; ++c) dw->f32()[c] += g[c] * xr[c] * r;
      }
    });
  }
}

static inline float silu(float x) {
  return x / (1.0f + std::exp(-x));
}

void CpuBackend::swiglu_forward(Tensor& h, const Tensor& gate, const Tensor& up) {
  expect_f32_on_cpu("swiglu_forward", {&h, &gate, &up});
  const float *g = gate.f32(), *u = up.f32();
  float* o = h.f32();
  cpu_pool().parallel_for(
      h.numel(),
      [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) o[i] = silu(g[i]) * u[i];
      },
      1 << 12);
}

void CpuBackend::swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dh, const Tensor& gate,
                                 const Tensor& up) {
  expect_f32_on_cpu("swiglu_backward", {&dgate, &dup, &dh, &gate, &up});
  const float *g = gate.f32(), *u = up.f32(), *d = dh.f32();
  float *dg = dgate.f32(), *du = dup.f32();
  cpu_pool().parallel_for(
      dh.numel(),
      [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          float s = 1.0f / (1.0f + std::exp(-g[i]));
          du[i] = d[i] * g[i] * s;
          dg[i] = d[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
        }
      },
      1 << 12);
}

void CpuBackend::swiglu_scaled_backward(Tensor& dgate, Tensor& dup, Tensor& dscale,
                                        const Tensor& dout, const Tensor& gate, const Tensor& up,
                                        const Tensor& scale) {
  const char* op = "swiglu_scaled_backward";
  expect_f32_on_cpu(op, {&dgate, &dup, &dscale, &dout, &gate, &up, &scale});
  const int64_t R = scale.numel(), I = R > 0 ? dout.numel() / R : 0;
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dgate, &dup, &gate, &up})
    MOEKIT_CHECK(t->numel() == dout.numel(), "{}: operand {} vs dout {}", op, t->shape().str(),
                 dout.shape().str());
  MOEKIT_CHECK(dscale.numel() == R && R * I == dout.numel(),
               "{}: scale {} and dscale {} vs dout {}", op, scale.shape().str(),
               dscale.shape().str(), dout.shape().str());
  const float *g = gate.f32(), *u = up.f32(), *d = dout.f32(), *s = scale.f32();
  float *dg = dgate.f32(), *du = dup.f32(), *ds = dscale.f32();
  cpu_pool().parallel_for(R, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float dot = 0.0f;
      for (int64_t i = r * I; i < (r + 1) * I; ++i) {
        const float sg = 1.0f / (1.0f + std::exp(-g[i])), dh = s[r] * d[i];
        dot += d[i] * g[i] * sg * u[i];
        du[i] = dh * g[i] * sg;
        dg[i] = dh * u[i] * sg * (1.0f + g[i] * (1.0f - sg));
      }
      ds[r] = dot;
    }
  });
}

namespace {

// Backend::rope into out of O (float, or uint16_t bf16 bits): per head, the pairs rotated and, out
// of place, the other elements copied, every one stored as O (store_elem). In place (out == x)
// only the pairs are written.
template <typename O>
void rope_rows(O* out, const float* x, const int32_t* positions, int64_t T, int64_t heads,
               int64_t head_stride, int64_t offset, int64_t half, const float* cos,
               const float* sin, int64_t max_pos, float sign) {
  const bool in_place = static_cast<const void*>(out) == static_cast<const void*>(x);
  const int64_t end = offset + 2 * half;
  cpu_pool().parallel_for(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t pos = positions[t];
      MOEKIT_CHECK(pos >= 0 && pos < max_pos, "position {} beyond the rope table ({})", pos,
                   max_pos);
      for (int64_t h = 0; h < heads; ++h) {
        const float* xh = x + (t * heads + h) * head_stride;
        O* oh = out + (t * heads + h) * head_stride;
        rotate_pairs(oh + offset, xh + offset, half, cos + pos * half, sin + pos * half, sign);
        if (in_place) continue;
        for (int64_t i = 0; i < offset; ++i) store_elem(oh + i, xh[i]);
        for (int64_t i = end; i < head_stride; ++i) store_elem(oh + i, xh[i]);
      }
    }
  });
}

}  // namespace

void CpuBackend::rope(Tensor& out, const Tensor& x, int64_t heads, int64_t head_stride,
                      int64_t offset, int64_t rope_dim, const Tensor& cos, const Tensor& sin,
                      const Tensor& positions, bool inverse) {
  rope_in_place(out, x, heads, head_stride, offset, rope_dim, cos, sin, positions);
  if (x.dtype() == DType::BF16) {  // widened exactly, then rotated as an F32 x (out of place: the
    // copied elements round back to the same bits, so in place the result is the same)
    return rope(out, x.to_f32(), heads, head_stride, offset, rope_dim, cos, sin, positions,
                inverse);
  }
  expect_f32_on_cpu("rope", {&x, &cos, &sin});
  const int64_t T = positions.numel(), half = rope_dim / 2, max_pos = rows(cos);
  const float sign = inverse ? -1.0f : 1.0f;
  // A BF16 out (the reference for the GPU's): the F32 result rounded as round_bf16 rounds.
  if (out.dtype() == DType::BF16)
    return rope_rows(static_cast<uint16_t*>(out.raw()), x.f32(), positions.i32(), T, heads,
                     head_stride, offset, half, cos.f32(), sin.f32(), max_pos, sign);
  expect_f32_on_cpu("rope", {&out});
  rope_rows(out.f32(), x.f32(), positions.i32(), T, heads, head_stride, offset, half, cos.f32(),
            sin.f32(), max_pos, sign);
}

void CpuBackend::copy_columns(Tensor& dst, int64_t dst_col, const Tensor& src, int64_t src_col,
                              int64_t n, bool accumulate) {
  const int64_t R = rows(dst), dc = cols(dst), sc = cols(src);
  MOEKIT_CHECK(rows(src) == R && dst_col + n <= dc && src_col + n <= sc, "copy_columns shapes");
  for (int64_t r = 0; r < R; ++r) {
    float* d = dst.f32() + r * dc + dst_col;
    const float* s = src.f32() + r * sc + src_col;
    if (accumulate)
      for (int64_t i = 0; i < n; ++i) d[i] += s[i];
    else
      std::memcpy(d, s, size_t(n) * 4);
  }
}

void CpuBackend::set_rows(Tensor& dst, const Tensor& src, const Tensor& rows_) {
  const int64_t D = set_rows_dims(dst, src, rows_), R = rows(dst), n = rows_.numel();
  const int32_t* row = rows_.i32();
  expect_indices(rows_, R, "set_rows", "row");
  // In order, so a repeated row keeps its last source (ops.h).
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(dst.f32() + int64_t(row[i]) * D, src.f32() + i * D, size_t(D) * 4);
}

void CpuBackend::mla_split_kv(Tensor& k, Tensor& v, const Tensor& kv_b, const Tensor& k_rope,
                              int64_t heads, int64_t dn, int64_t dr, int64_t dv) {
  expect_f32_on_cpu("mla_split_kv", {&k, &v, &kv_b, &k_rope});  // BF16: CUDA only (ops.h)
  const int64_t T = rows(kv_b);
  cpu_pool().parallel_for(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        const float* src = kv_b.f32() + (t * heads + h) * (dn + dv);
        float* kd = k.f32() + (t * heads + h) * (dn + dr);
        std::memcpy(kd, src, size_t(dn) * 4);
        std::memcpy(kd + dn, k_rope.f32() + t * dr, size_t(dr) * 4);
        std::memcpy(v.f32() + (t * heads + h) * dv, src + dn, size_t(dv) * 4);
      }
  });
}

void CpuBackend::mla_split_kv_backward(Tensor& dkv_b, Tensor& dk_rope, const Tensor& dk,
                                       const Tensor& dv, int64_t heads, int64_t dn, int64_t dr,
                                       int64_t dvd) {
  expect_f32_on_cpu("mla_split_kv_backward", {&dkv_b, &dk_rope, &dk, &dv});
  const int64_t T = rows(dkv_b);
  cpu_pool().parallel_for(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* kr = dk_rope.f32() + t * dr;
      std::memset(kr, 0, size_t(dr) * 4);
      for (int64_t h = 0; h < heads; ++h) {
        float* dst = dkv_b.f32() + (t * heads + h) * (dn + dvd);
        const float* kd = dk.f32() + (t * heads + h) * (dn + dr);
        std::memcpy(dst, kd, size_t(dn) * 4);
        std::memcpy(dst + dn, dv.f32() + (t * heads + h) * dvd, size_t(dvd) * 4);
        for (int64_t i = 0; i < dr; ++i) kr[i] += kd[dn + i];
      }
    }
  });
}

}  // namespace moekit
