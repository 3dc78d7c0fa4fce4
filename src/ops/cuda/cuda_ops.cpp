// CUDA backend, host side part 2: every op besides memory and GEMM. Each method checks its
// tensors (on the GPU, right dtype and size), then calls the kernel's launch function
// (ops/cuda/kernels.h) and turns a failed launch into an Error naming the op. Index tensors that
// a kernel would dereference (token ids, positions, scatter rows) go through check_indices first,
// since a kernel cannot throw: the kernel runs on its range-safe copy, and a bad entry is reported
// at the next synchronising call (cuda_backend.h). The ops of a decode step (rope, set_rows,
// embedding_forward, moe_experts_small, latent_attention and the fused MLA step ops) check their
// indices inside their own kernel instead (index_check): the check kernel and its copy were
// ~1.6 us each, about six per layer.
#include <algorithm>

#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/cuda_util.h"
#include "ops/cuda/kernels.h"
#include "ops/cuda/stream.h"

namespace moekit {

using cuda::check;
using cuda::expect;
using cuda::expect_all_f32;
using cuda::expect_f32;
using cuda::expect_f32_or_bf16;
using cuda::expect_numel;

void CudaBackend::embedding_forward(Tensor& out, const Tensor& table, const Tensor& ids) {
  const int64_t T = ids.numel(), C = cols(table), V = rows(table);
  expect_f32(out, "embedding_forward", "out");
  // F32, or BF16 (a frozen table of a bf16 model): read as stored, widened exactly.
  const bool bf16 = table.dtype() == DType::BF16;
  expect(table, bf16 ? DType::BF16 : DType::F32, "embedding_forward", "table");
  expect_numel(out, T * C, "embedding_forward", "out");
  const cuda::IndexCheck ic = index_check(ids, V, "embedding_forward", "token id");
  check(cuda::embedding_forward(out.f32(), table.raw(), bf16, ids.i32(), ic, T, C),
        "embedding_forward");
}

void CudaBackend::embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) {
  // dtable[ids[t]] += dout[t]: a repeated id is a scatter-add onto one row, in token order.
  expect_f32(dtable, "embedding_backward", "dtable");
  expect_f32(dout, "embedding_backward", "dout");
  expect_numel(dout, ids.numel() * cols(dtable), "embedding_backward", "dout");
  Tensor flat = dout.reshape({ids.numel(), cols(dtable)});
  scatter_add_rows(dtable, flat, ids, nullptr);
}

// out F32, or BF16 (rounded as stored: a norm read only by bf16 GEMMs).
void CudaBackend::rmsnorm_forward(Tensor& out, Tensor& rstd, const Tensor& x, const Tensor& w,
                                  float eps) {
  const int64_t T = rows(x), C = cols(x);
  expect_f32_or_bf16(out, "rmsnorm_forward", "out");
  expect_f32(rstd, "rmsnorm_forward", "rstd");
  expect_f32(x, "rmsnorm_forward", "x");
  expect_f32(w, "rmsnorm_forward", "w");
  expect_numel(out, T * C, "rmsnorm_forward", "out");
  expect_numel(rstd, T, "rmsnorm_forward", "rstd");
  expect_numel(w, C, "rmsnorm_forward", "w");
  check(cuda::rmsnorm_forward(out.raw(), out.dtype(), rstd.f32(), x.f32(), w.f32(), T, C, eps),
        "rmsnorm_forward");
}

void CudaBackend::rmsnorm_backward(Tensor& dx, Tensor* dx_bf16, Tensor* dw, const Tensor& dout,
                                   const Tensor& x, const Tensor& w, const Tensor& rstd,
                                   bool accumulate) {
  const int64_t T = rows(x), C = cols(x);
  const char* op = "rmsnorm_backward";
  expect_f32(dx, op, "dx");
  expect_f32(dout, op, "dout");
  expect_f32(x, op, "x");
  expect_f32(w, op, "w");
  expect_f32(rstd, op, "rstd");
  expect_numel(dx, T * C, op, "dx");
  expect_numel(dout, T * C, op, "dout");
  void* d16 = nullptr;
  if (dx_bf16 && dx_bf16->defined()) {
    expect(*dx_bf16, DType::BF16, op, "dx_bf16");
    expect_numel(*dx_bf16, T * C, op, "dx_bf16");
    d16 = dx_bf16->raw();
  }
  check(cuda::rmsnorm_backward_dx(dx.f32(), d16, dout.f32(), x.f32(), w.f32(), rstd.f32(), T, C,
                                  accumulate),
        op);
  if (dw && dw->defined()) {
    expect_f32(*dw, op, "dw");
    expect_numel(*dw, C, op, "dw");
    Tensor partial = scratch({std::max<int64_t>(1, cuda::rmsnorm_dw_chunks(T)), C}, DType::F32);
    check(
        cuda::rmsnorm_backward_dw(dw->f32(), partial.f32(), dout.f32(), x.f32(), rstd.f32(), T, C),
        op);
  }
}

// SwiGLU: F32 or BF16 activations (the MoE layer's bf16 path), see ops.h for the combinations.
void CudaBackend::swiglu_forward(Tensor& h, const Tensor& gate, const Tensor& up) {
  const char* op = "swiglu_forward";
  expect_f32_or_bf16(h, op, "h");
  // gate and up: h's dtype, or F32 with a BF16 h (ops.h).
  expect(gate, gate.dtype() == DType::F32 ? DType::F32 : h.dtype(), op, "gate");
  expect(up, gate.dtype(), op, "up");
  expect_numel(gate, h.numel(), op, "gate");
  expect_numel(up, h.numel(), op, "up");
  check(cuda::swiglu_forward(h.raw(), h.dtype(), gate.raw(), up.raw(), gate.dtype(), h.numel()),
        op);
}

void CudaBackend::swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dh, const Tensor& gate,
                                  const Tensor& up) {
  const char* op = "swiglu_backward";
  expect_f32_or_bf16(dgate, op, "dgate");
  expect(dup, dgate.dtype(), op, "dup");
  expect_f32_or_bf16(dh, op, "dh");
  expect_f32_or_bf16(gate, op, "gate");
  expect(up, gate.dtype(), op, "up");
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dgate, &dup, &gate, &up})
    expect_numel(*t, dh.numel(), op, "operand");
  check(cuda::swiglu_backward(dgate.raw(), dup.raw(), dgate.dtype(), dh.raw(), dh.dtype(),
                              gate.raw(), up.raw(), gate.dtype(), dh.numel()),
        op);
}

void CudaBackend::swiglu_scaled_backward(Tensor& dgate, Tensor& dup, Tensor& dscale,
                                         const Tensor& dout, const Tensor& gate, const Tensor& up,
                                         const Tensor& scale) {
  const char* op = "swiglu_scaled_backward";
  expect_f32_or_bf16(dout, op, "dout");
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dgate, &dup, &gate, &up}) {
    expect(*t, dout.dtype(), op, "operand");
    expect_numel(*t, dout.numel(), op, "operand");
  }
  expect_f32(scale, op, "scale");
  expect_f32(dscale, op, "dscale");
  const int64_t R = scale.numel(), I = R > 0 ? dout.numel() / R : 0;
  expect_numel(dscale, R, op, "dscale");
  MOEKIT_CHECK(R * I == dout.numel(), "{}: scale {} vs dout {}", op, scale.shape().str(),
               dout.shape().str());
  check(cuda::swiglu_scaled_backward(dgate.raw(), dup.raw(), dscale.f32(), dout.raw(), gate.raw(),
                                     up.raw(), scale.f32(), dout.dtype(), R, I),
        op);
}

// out F32 (x itself: in place), or BF16 (a tensor of its own; the rotated values rounded as
// stored, ops.h).
void CudaBackend::rope(Tensor& out, const Tensor& x, int64_t heads, int64_t head_stride,
                       int64_t offset, int64_t rope_dim, const Tensor& cos, const Tensor& sin,
                       const Tensor& positions, bool inverse) {
  const char* op = "rope";
  expect_f32_or_bf16(x, op, "x");
  expect_f32_or_bf16(out, op, "out");
  expect_f32(cos, op, "cos");
  expect_f32(sin, op, "sin");
  rope_in_place(out, x, heads, head_stride, offset, rope_dim, cos, sin, positions);
  const int64_t T = positions.numel();
  const cuda::IndexCheck ic = index_check(positions, rows(cos), op, "position");
  check(cuda::rope(out.raw(), out.dtype(), x.raw(), x.dtype(), T, heads, head_stride, offset,
                   rope_dim / 2, cos.f32(), sin.f32(), positions.i32(), ic, inverse),
        op);
}

// q, k, v of attention: F32, or BF16 under the Bf16 precision (its path rounds them anyway).
void CudaBackend::expect_attention_inputs(const Tensor& q, const Tensor& k, const Tensor& v,
                                          const char* op) const {
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    if (t->dtype() == DType::BF16 && precision_ != Precision::Bf16)
      fail("CUDA {}: BF16 {} needs the bf16 precision", op, name);
    if (t->dtype() == DType::BF16)
      expect(*t, DType::BF16, op, name);
    else
      expect_f32(*t, op, name);
  }
}

// out (O in backward): F32, or BF16 under the Bf16 precision (rounded as stored, ops.h).
void CudaBackend::expect_attention_output(const Tensor& out, const char* op) const {
  if (out.dtype() == DType::BF16 && precision_ != Precision::Bf16)
    fail("CUDA {}: BF16 out needs the bf16 precision", op);
  expect_f32_or_bf16(out, op, "out");
}

void CudaBackend::attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                                    const Tensor& v, int64_t batch, int64_t seq, int64_t heads,
                                    float scale) {
  const char* op = "attention_forward";
  expect_attention_output(out, op);
  expect_f32(lse, op, "lse");
  expect_attention_inputs(q, k, v, op);
  const int64_t n = batch * seq * heads;
  if (n == 0) return;
  cuda::AttentionShape s{batch, seq, heads, q.numel() / n, v.numel() / n, scale};
  expect_numel(k, q.numel(), op, "k");
  expect_numel(out, v.numel(), op, "out");
  expect_numel(lse, n, op, "lse");
  if (precision_ == Precision::Bf16)
    return attention_forward_tc(out, lse, q, k, v, batch, seq, heads, scale);
  check(cuda::attention_forward(out.f32(), lse.f32(), q.f32(), k.f32(), v.f32(), s), op);
}

void CudaBackend::attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                                     const Tensor& out, const Tensor& lse, const Tensor& q,
                                     const Tensor& k, const Tensor& v, int64_t batch, int64_t seq,
                                     int64_t heads, float scale) {
  const char* op = "attention_backward";
  expect_all_f32({&dq, &dk, &dv, &dout, &lse}, op);
  expect_attention_output(out, op);
  expect_attention_inputs(q, k, v, op);
  const int64_t n = batch * seq * heads;
  if (n == 0) return;
  cuda::AttentionShape s{batch, seq, heads, q.numel() / n, v.numel() / n, scale};
  expect_numel(dq, q.numel(), op, "dq");
  expect_numel(dk, q.numel(), op, "dk");
  expect_numel(dv, v.numel(), op, "dv");
  expect_numel(dout, v.numel(), op, "dout");
  expect_numel(out, v.numel(), op, "out");
  expect_numel(lse, n, op, "lse");
  if (precision_ == Precision::Bf16)
    return attention_backward_tc(dq, dk, dv, dout, out, lse, q, k, v, batch, seq, heads, scale);
  Tensor delta = scratch({n}, DType::F32);
  check(cuda::attention_backward(dq.f32(), dk.f32(), dv.f32(), delta.f32(), dout.f32(), out.f32(),
                                 lse.f32(), q.f32(), k.f32(), v.f32(), s),
        op);
}

void CudaBackend::causal_softmax(Tensor& x, int64_t group, int64_t offset) {
  const char* op = "causal_softmax";
  expect_f32(x, op, "x");
  MOEKIT_CHECK(group > 0 && offset >= 0, "causal_softmax: group {}, offset {}", group, offset);
  check(cuda::causal_softmax(x.f32(), rows(x), cols(x), group, offset), op);
}

void CudaBackend::argmax(Tensor& idx, const Tensor& x, int64_t n) {
  const char* op = "argmax";
  expect(idx, DType::I32, op, "idx");
  expect_f32(x, op, "x");
  expect_numel(idx, rows(x), op, "idx");
  MOEKIT_CHECK(n > 0 && n <= cols(x), "argmax: n {} of {} columns", n, cols(x));
  const int64_t R = rows(x);
  if (argmax_slots_.numel() < 3 * R) {  // zeroed once; every launch leaves them zero again
    argmax_slots_ = Tensor::empty({3 * R}, DType::I32, Device::CUDA);
    fill(argmax_slots_, 0.0f);  // all-zero bits
  }
  auto* best = reinterpret_cast<unsigned long long*>(argmax_slots_.i32());  // 8-byte aligned
  auto* done = reinterpret_cast<unsigned*>(argmax_slots_.i32() + 2 * R);
  check(cuda::argmax(idx.i32(), best, done, x.f32(), R, cols(x), n), op);
}

void CudaBackend::sample(Tensor& id, const Tensor& logits, int64_t n, const SampleParams& p,
                         double u01) {
  const char* op = "sample";
  expect(id, DType::I32, op, "id");
  expect_f32(logits, op, "logits");
  check_sample(id, logits, n, p, u01);
  MOEKIT_CHECK(n <= cuda::kSampleMaxN, "sample: n {} above the GPU's {}", n, cuda::kSampleMaxN);
  if (!sample_scratch_.defined()) {  // zeroed once; every call leaves it zero again
    sample_scratch_ =
        Tensor::empty({int64_t(cuda::kSampleScratchBytes / 4)}, DType::I32, Device::CUDA);
    fill(sample_scratch_, 0.0f);  // all-zero bits
  }
  cuda::SampleLaunch s;
  s.inv_temperature = 1.0f / p.temperature;  // as the CPU's rule computes it
  s.top_k = p.top_k < n ? p.top_k : 0;
  s.top_p = p.top_p;
  s.u01 = u01;
  check(cuda::sample(id.i32(), sample_scratch_.raw(), logits.f32(), n, s), op);
}

void CudaBackend::set_rows(Tensor& dst, const Tensor& src, const Tensor& rows_) {
  const char* op = "set_rows";
  expect_f32(dst, op, "dst");
  expect_f32(src, op, "src");
  const int64_t D = set_rows_dims(dst, src, rows_), n = rows_.numel();
  if (n == 0 || D == 0) return;
  const cuda::IndexCheck ic = index_check(rows_, rows(dst), op, "row");
  check(cuda::set_rows(dst.f32(), src.f32(), rows_.i32(), ic, n, D), op);
}

void CudaBackend::latent_attention(Tensor& ctx, const Tensor& q_lat, const Tensor& q_rope,
                                   const Tensor& kv_latent, const Tensor& k_rope,
                                   const Tensor& positions, int64_t heads, float scale) {
  const char* op = "latent_attention";
  expect_f32(ctx, op, "ctx");
  expect_f32(q_lat, op, "q_lat");
  expect_f32(q_rope, op, "q_rope");
  expect_f32(kv_latent, op, "kv_latent");
  expect_f32(k_rope, op, "k_rope");
  const auto [n, H, r, dr, cap] =
      latent_attention_dims(ctx, q_lat, q_rope, kv_latent, k_rope, positions, heads);
  MOEKIT_CHECK(r <= cuda::kLatentMaxRank && dr <= cuda::kLatentMaxRope,
               "latent_attention: rank {} and rope dim {} beyond the kernel's limits ({} and {})",
               r, dr, cuda::kLatentMaxRank, cuda::kLatentMaxRope);
  if (n == 0) return;
  // Checked inside the kernels (a separate check kernel and copy cost ~1.6 us per step and layer).
  const cuda::IndexCheck ic = index_check(positions, cap, op, "position");
  // The partials of up to 64 MB of tokens per launch (a long prompt through this op would
  // otherwise need n * splits * H * r floats at once); a decode step is one launch.
  const int64_t splits = cuda::latent_splits(cap), per_token = splits * H * (r + 2);
  const int64_t step =
      std::clamp<int64_t>((int64_t(16) << 20) / per_token, 1, std::min(n, cuda::kLatentMaxTokens));
  Tensor acc = scratch({step * splits * H * r}, DType::F32);
  Tensor ml = scratch({step * splits * H * 2}, DType::F32);
  for (int64_t i0 = 0; i0 < n; i0 += step) {
    const cuda::LatentShape s{std::min(step, n - i0), H, r, dr, cap, scale};
    cuda::IndexCheck launch_check = ic;
    if (i0 > 0) launch_check.slot = nullptr;  // the first launch records for all n positions
    check(cuda::latent_attention(ctx.f32() + i0 * H * r, acc.f32(), ml.f32(),
                                 q_lat.f32() + i0 * H * r, q_rope.f32() + i0 * H * dr,
                                 kv_latent.f32(), k_rope.f32(), positions.i32() + i0, launch_check,
                                 positions.i32(), n, s),
          op);
  }
}

// The fused ops of MLA's decode step (cuda_mla_step.cu): shapes checked as the CPU backend does
// (ops.h's mla_*_dims), positions inside the kernels (index_check), kv_b F32 or BF16 as stored.
void CudaBackend::mla_cache_write(Tensor& kv_latent, Tensor& k_rope, const Tensor& kv_a,
                                  const Tensor& norm_w, float eps, const Tensor& cos,
                                  const Tensor& sin, const Tensor& positions) {
  const char* op = "mla_cache_write";
  expect_all_f32({&kv_latent, &k_rope, &kv_a, &norm_w, &cos, &sin}, op);
  const MlaStepDims d = mla_cache_write_dims(kv_latent, k_rope, kv_a, norm_w, cos, sin, positions);
  if (d.n == 0) return;
  const cuda::IndexCheck ic = index_check(positions, d.limit, op, "position");
  const cuda::MlaStepShape s{.tokens = d.n, .heads = 1, .rank = d.r, .dn = 0, .dr = d.dr, .dv = 0};
  check(cuda::mla_cache_write(kv_latent.f32(), k_rope.f32(), kv_a.f32(), norm_w.f32(), eps,
                              cos.f32(), sin.f32(), positions.i32(), ic, s),
        op);
}

// The prefill's kv_a split in one launch (the cache write's kernel writing row i, and rstd) where
// every operand is as that kernel takes it; anything else goes to the default composition, whose
// ops check and report it. 8192 tokens of V2-Lite: two column copies, the rope and the norm were
// ~31 us of kernels and four launch gaps per layer on the H200.
void CudaBackend::mla_kv_a_split(Tensor& kv_latent, Tensor& rstd, Tensor& k_rope,
                                 const Tensor& kv_a, const Tensor& norm_w, float eps,
                                 const Tensor& cos, const Tensor& sin, const Tensor& positions) {
  const char* op = "mla_kv_a_split";
  auto f32_here = [](const Tensor& t) {
    return t.defined() && t.dtype() == DType::F32 && t.device() == Device::CUDA;
  };
  const bool shapes = kv_a.ndim() == 2 && kv_latent.ndim() == 2 && k_rope.ndim() == 2 &&
                      kv_latent.dim(0) == kv_a.dim(0) && k_rope.dim(0) == kv_a.dim(0) &&
                      kv_a.dim(1) == kv_latent.dim(1) + k_rope.dim(1) && k_rope.dim(1) % 2 == 0 &&
                      rstd.numel() == kv_a.dim(0) && norm_w.numel() == kv_latent.dim(1) &&
                      cos.ndim() == 2 && cos.dim(1) * 2 == k_rope.dim(1) &&
                      sin.shape() == cos.shape() && positions.numel() == kv_a.dim(0);
  const bool latent_ok = kv_latent.device() == Device::CUDA &&
                         (kv_latent.dtype() == DType::F32 || kv_latent.dtype() == DType::BF16);
  if (!shapes || !latent_ok || !f32_here(rstd) || !f32_here(k_rope) || !f32_here(kv_a) ||
      !f32_here(norm_w) || !f32_here(cos) || !f32_here(sin) || positions.dtype() != DType::I32 ||
      positions.device() != Device::CUDA)
    return Backend::mla_kv_a_split(kv_latent, rstd, k_rope, kv_a, norm_w, eps, cos, sin, positions);
  const cuda::IndexCheck ic = index_check(positions, rows(cos), op, "position");
  const cuda::MlaStepShape s{.tokens = kv_a.dim(0),
                             .heads = 1,
                             .rank = kv_latent.dim(1),
                             .dn = 0,
                             .dr = k_rope.dim(1),
                             .dv = 0};
  check(cuda::mla_kv_a_split(kv_latent.raw(), kv_latent.dtype() == DType::BF16, rstd.f32(),
                             k_rope.f32(), kv_a.f32(), norm_w.f32(), eps, cos.f32(), sin.f32(),
                             positions.i32(), ic, s),
        op);
}

void CudaBackend::mla_absorb_query(Tensor& q_lat, Tensor& q_rope, const Tensor& q,
                                   const Tensor& kv_b, const Tensor& cos, const Tensor& sin,
                                   const Tensor& positions, int64_t heads, int64_t dn, int64_t dr,
                                   int64_t dv) {
  const char* op = "mla_absorb_query";
  expect_all_f32({&q_lat, &q_rope, &q, &cos, &sin}, op);
  expect_f32_or_bf16(kv_b, op, "kv_b");
  const MlaStepDims d =
      mla_absorb_query_dims(q_lat, q_rope, q, kv_b, cos, sin, positions, heads, dn, dr, dv);
  MOEKIT_CHECK(dn <= cuda::kMlaAbsorbMaxDn,
               "mla_absorb_query: head dim {} beyond the kernel's limit ({})", dn,
               cuda::kMlaAbsorbMaxDn);
  if (d.n == 0) return;
  const cuda::IndexCheck ic = index_check(positions, d.limit, op, "position");
  const cuda::MlaStepShape s{
      .tokens = d.n, .heads = heads, .rank = d.r, .dn = dn, .dr = dr, .dv = dv};
  check(cuda::mla_absorb_query(q_lat.f32(), q_rope.f32(), q.f32(), kv_b.raw(),
                               kv_b.dtype() == DType::BF16, cos.f32(), sin.f32(), positions.i32(),
                               ic, s),
        op);
}

void CudaBackend::mla_value_heads(Tensor& o, const Tensor& ctx, const Tensor& kv_b, int64_t heads,
                                  int64_t dn, int64_t dv) {
  const char* op = "mla_value_heads";
  expect_all_f32({&o, &ctx}, op);
  expect_f32_or_bf16(kv_b, op, "kv_b");
  const MlaStepDims d = mla_value_heads_dims(o, ctx, kv_b, heads, dn, dv);
  if (d.n == 0) return;
  const cuda::MlaStepShape s{
      .tokens = d.n, .heads = heads, .rank = d.r, .dn = dn, .dr = 0, .dv = dv};
  check(cuda::mla_value_heads(o.f32(), ctx.f32(), kv_b.raw(), kv_b.dtype() == DType::BF16, s), op);
}

void CudaBackend::cross_entropy_forward(Tensor& losses, const Tensor& logits,
                                        const Tensor& targets) {
  const char* op = "cross_entropy_forward";
  const int64_t T = rows(logits), V = cols(logits);
  expect_f32(losses, op, "losses");
  expect_f32(logits, op, "logits");
  expect(targets, DType::I32, op, "targets");
  expect_numel(losses, T, op, "losses");
  expect_numel(targets, T, op, "targets");
  const Tensor safe = check_indices(targets, V, op, "target", /*allow_negative=*/true);
  check(cuda::cross_entropy_forward(losses.f32(), logits.f32(), safe.i32(), T, V), op);
}

void CudaBackend::cross_entropy_backward(Tensor& dlogits, const Tensor& logits,
                                         const Tensor& targets, float scale) {
  const char* op = "cross_entropy_backward";
  const int64_t T = rows(logits), V = cols(logits);
  expect_f32_or_bf16(dlogits, op, "dlogits");  // BF16: the LM head's dlogits under Bf16
  expect_f32(logits, op, "logits");
  expect(targets, DType::I32, op, "targets");
  expect_numel(dlogits, T * V, op, "dlogits");
  expect_numel(targets, T, op, "targets");
  const Tensor safe = check_indices(targets, V, op, "target", /*allow_negative=*/true);
  check(cuda::cross_entropy_backward(dlogits.raw(), dlogits.dtype() == DType::BF16, logits.f32(),
                                     safe.i32(), T, V, scale),
        op);
}

void CudaBackend::cross_entropy_fused(Tensor& losses, Tensor& dlogits, const Tensor& logits,
                                      const Tensor& targets, float scale) {
  const char* op = "cross_entropy_fused";
  const int64_t T = rows(logits), V = cols(logits);
  expect_f32(losses, op, "losses");
  expect_f32_or_bf16(dlogits, op, "dlogits");  // BF16: the LM head's dlogits under Bf16
  expect_f32_or_bf16(logits, op, "logits");    // BF16: the LM head's training logits under Bf16
  if (logits.dtype() == DType::BF16 && dlogits.dtype() != DType::BF16)
    fail("CUDA {}: BF16 logits take BF16 dlogits, got {}", op, dtype_name(dlogits.dtype()));
  expect(targets, DType::I32, op, "targets");
  expect_numel(losses, T, op, "losses");
  expect_numel(dlogits, T * V, op, "dlogits");
  expect_numel(targets, T, op, "targets");
  const Tensor safe = check_indices(targets, V, op, "target", /*allow_negative=*/true);
  check(cuda::cross_entropy_fused(losses.f32(), dlogits.raw(), dlogits.dtype() == DType::BF16,
                                  logits.raw(), logits.dtype() == DType::BF16, safe.i32(), T, V,
                                  scale),
        op);
}

void CudaBackend::gather_rows(Tensor& out, const Tensor& x, const Tensor& rows_,
                              const Tensor* weights) {
  const char* op = "gather_rows";
  const int64_t N = rows_.numel(), C = cols(x);
  if (x.dtype() == DType::I32 || out.dtype() == DType::I32) {
    // Index tensors (the MoE layer's slot tokens, compacted to the trainable experts' slots).
    expect(x, DType::I32, op, "x");
    expect(out, DType::I32, op, "out");
    if (weights) fail("CUDA {}: I32 rows take no weights", op);
  } else {
    expect_f32_or_bf16(out, op, "out");  // BF16: the MoE layer's bf16 activations
    expect_f32_or_bf16(x, op, "x");      // BF16: the layer's input rounded once for its GEMMs
  }
  expect_numel(out, N * C, op, "out");
  if (weights) {
    expect_f32(*weights, op, "weights");
    expect_numel(*weights, N, op, "weights");
  }
  const cuda::IndexCheck ic = index_check(rows_, rows(x), op, "row", /*allow_negative=*/true);
  check(cuda::gather_rows(out.raw(), out.dtype(), x.raw(), x.dtype(), rows_.i32(),
                          weights ? weights->f32() : nullptr, N, C, ic),
        op);
}

namespace {

// The operands of a sum of rows of x into rows of out (scatter_add_rows, combine_slots): out F32,
// x [n, cols(out)] F32 or BF16, weights (if any) F32 [n].
void expect_scatter_operands(const Tensor& out, const Tensor& x, const Tensor* weights, int64_t n,
                             const char* op) {
  expect_f32(out, op, "out");
  expect_f32_or_bf16(x, op, "x");
  expect_numel(x, n * cols(out), op, "x");
  if (weights) {
    expect_f32(*weights, op, "weights");
    expect_numel(*weights, n, op, "weights");
  }
}

}  // namespace

void CudaBackend::scatter_add_rows(Tensor& out, const Tensor& x, const Tensor& rows_,
                                   const Tensor* weights) {
  const char* op = "scatter_add_rows";
  const int64_t N = rows_.numel(), C = cols(out), R = rows(out);
  expect_scatter_operands(out, x, weights, N, op);
  if (N == 0) return;
  const Tensor safe = check_indices(rows_, R, op, "row", /*allow_negative=*/true);
  // The plan: positions stably sorted by destination row, so each row adds its sources in order.
  const size_t temp_bytes = cuda::row_plan_temp_bytes(N, R);
  Tensor temp = scratch({int64_t((temp_bytes + 3) / 4) + 1}, DType::I32);
  Tensor keys = scratch({N}, DType::I32), sorted = scratch({N}, DType::I32),
         iota = scratch({N}, DType::I32), order = scratch({N}, DType::I32);
  check(cuda::row_plan(temp.raw(), temp_bytes, safe.i32(), keys.i32(), sorted.i32(), iota.i32(),
                       order.i32(), N, R),
        op);
  check(cuda::scatter_add_planned(out.f32(), x.raw(), x.dtype(), weights ? weights->f32() : nullptr,
                                  sorted.i32(), order.i32(), N, C, R),
        op);
}

void CudaBackend::moe_dispatch_plan(Tensor& slot_token, Tensor& slot_pair, Tensor& slot_weight,
                                    Tensor& token_slots, Tensor& expert_begin, Tensor& expert_rows,
                                    const Tensor& topk_idx, const Tensor& topk_w, int64_t n_experts,
                                    int64_t align) {
  const char* op = "moe_dispatch_plan";
  const int64_t N = topk_idx.numel(), K = cols(topk_idx);
  MOEKIT_CHECK(n_experts >= 1 && n_experts <= cuda::kPlanMaxExperts,
               "{}: {} experts (the CUDA plan takes 1 to {})", op, n_experts,
               cuda::kPlanMaxExperts);
  MOEKIT_CHECK(align >= 1 && align <= 4096, "{}: align {} (must be in [1, 4096])", op, align);
  const int64_t S = dispatch_slots(N, n_experts, align);
  MOEKIT_CHECK(S < (int64_t(1) << 31), "{}: {} slots exceed int32", op, S);
  expect(slot_token, DType::I32, op, "slot_token");
  expect(slot_pair, DType::I32, op, "slot_pair");
  expect(token_slots, DType::I32, op, "token_slots");
  expect(expert_begin, DType::I32, op, "expert_begin");
  expect(expert_rows, DType::I32, op, "expert_rows");
  expect_f32(slot_weight, op, "slot_weight");
  expect_f32(topk_w, op, "topk_w");
  expect_numel(topk_w, N, op, "topk_w");
  expect_numel(slot_token, S, op, "slot_token");
  expect_numel(slot_pair, S, op, "slot_pair");
  expect_numel(slot_weight, S, op, "slot_weight");
  expect_numel(token_slots, N, op, "token_slots");
  expect_numel(expert_begin, n_experts + 1, op, "expert_begin");
  expect_numel(expert_rows, n_experts, op, "expert_rows");
  const cuda::IndexCheck ic = index_check(topk_idx, n_experts, op, "expert");
  Tensor counts = scratch({cuda::moe_plan_blocks(N) * (n_experts + 1)}, DType::I32);
  const cuda::DispatchPlanBuffers b{.slot_token = slot_token.i32(),
                                    .slot_pair = slot_pair.i32(),
                                    .slot_weight = slot_weight.f32(),
                                    .token_slots = token_slots.i32(),
                                    .expert_begin = expert_begin.i32(),
                                    .expert_rows = expert_rows.i32(),
                                    .counts = counts.i32()};
  check(cuda::moe_dispatch_plan(b, topk_idx.i32(), ic, topk_w.f32(), N, K, n_experts, align, S),
        op);
}

void CudaBackend::combine_slots(Tensor& out, const Tensor& x, const Tensor& slot_token,
                                const Tensor& token_slots, const Tensor* weights) {
  const char* op = "combine_slots";
  const int64_t T = rows(out), C = cols(out), S = slot_token.numel();
  expect(token_slots, DType::I32, op, "token_slots");
  MOEKIT_CHECK(token_slots.ndim() == 2 && token_slots.dim(0) == T, "{}: token_slots {} for out {}",
               op, token_slots.shape().str(), out.shape().str());
  const int64_t K = token_slots.dim(1);
  if (K < 1 || K > cuda::kCombineMaxK)
    return Backend::combine_slots(out, x, slot_token, token_slots, weights);
  expect_scatter_operands(out, x, weights, S, op);
  if (T == 0 || C == 0) return;
  const cuda::IndexCheck ic = index_check(token_slots, S, op, "slot");
  check(cuda::moe_combine(out.f32(), x.raw(), x.dtype(), weights ? weights->f32() : nullptr,
                          token_slots.i32(), ic, T, K, C),
        op);
}

void CudaBackend::moe_experts_small(Tensor& y, const Tensor& x, const Tensor& topk_idx,
                                    const Tensor& topk_w, std::span<const ExpertWeights> experts,
                                    bool accumulate, const ExpertWeights* shared) {
  const char* op = "moe_experts_small";
  const auto [T, K, H, I, E, Is, dtype] =
      moe_experts_small_dims(y, x, topk_idx, topk_w, experts, shared);
  expect_f32(y, op, "y");
  expect_f32(x, op, "x");
  expect(topk_idx, DType::I32, op, "topk_idx");
  expect_f32(topk_w, op, "topk_w");
  if (dtype != DType::F32 && dtype != DType::BF16)
    fail("CUDA {}: {} weights (supported: F32, BF16)", op, dtype_name(dtype));
  std::vector<const void*> ptrs;  // [gate_e, up_e, down_e] per expert
  ptrs.reserve(size_t(3 * E));
  for (const ExpertWeights& w : experts)
    for (const Tensor* t : {w.gate_proj, w.up_proj, w.down_proj}) {
      expect(*t, dtype, op, "expert weight");
      ptrs.push_back(t->raw());
    }
  const bool with_shared = shared && Is > 0;  // (dtypes checked by moe_experts_small_dims)
  if (T == 0 || H == 0) return;
  if ((K == 0 || I == 0) && !with_shared) {  // no expert contributes
    if (!accumulate) fill(y, 0.0f);
    return;
  }
  const cuda::IndexCheck ic = index_check(topk_idx, E, op, "expert");
  Tensor table;
  {
    std::lock_guard<std::mutex> lock(tables_mu_);
    auto it = expert_tables_.find(ptrs);
    if (it == expert_tables_.end()) {
      // Bound the cache. A dropped table's block returns to the allocator, whose next user is
      // later work on the same stream, so kernels already queued still read the old pointers.
      if (expert_tables_.size() >= 4096) expert_tables_.clear();
      Tensor t = upload_table(ptrs.data(), ptrs.size() * sizeof(void*), op);
      it = expert_tables_.emplace(std::move(ptrs), t).first;
    }
    table = it->second;
  }
  if (capture_pool_) capture_pool_->keep.push_back(table);  // a replay reads it
  Tensor h = scratch({T * K, I}, DType::F32);
  // The shared experts' pointers travel as kernel arguments (a captured graph keeps them), their
  // activations in a scratch of their own (rows 16-byte aligned whenever Is allows vector loads).
  cuda::SmallShared sh;
  Tensor hs;
  if (with_shared) {
    hs = scratch({T, Is}, DType::F32);
    sh = {shared->gate_proj->raw(), shared->up_proj->raw(), shared->down_proj->raw(), hs.f32(), Is};
  }
  check(cuda::moe_experts_small(y.f32(), h.f32(), x.f32(), topk_idx.i32(), ic, topk_w.f32(),
                                static_cast<const void* const*>(table.raw()), dtype == DType::BF16,
                                T, K, H, I, accumulate, sh),
        op);
}

void CudaBackend::copy_columns(Tensor& dst, int64_t dst_col, const Tensor& src, int64_t src_col,
                               int64_t n, bool accumulate) {
  const int64_t R = rows(dst), dc = cols(dst), sc = cols(src);
  expect_f32(dst, "copy_columns", "dst");
  expect_f32(src, "copy_columns", "src");
  MOEKIT_CHECK(rows(src) == R && dst_col + n <= dc && src_col + n <= sc, "copy_columns shapes");
  check(cuda::copy_columns(dst.f32() + dst_col, dc, src.f32() + src_col, sc, R, n, accumulate),
        "copy_columns");
}

void CudaBackend::mla_split_kv(Tensor& k, Tensor& v, const Tensor& kv_b, const Tensor& k_rope,
                               int64_t heads, int64_t dn, int64_t dr, int64_t dv) {
  const char* op = "mla_split_kv";
  const int64_t T = rows(kv_b);
  expect_f32(k_rope, op, "k_rope");
  expect_f32_or_bf16(kv_b, op, "kv_b");
  expect_f32_or_bf16(k, op, "k");
  expect(v, k.dtype(), op, "v");
  expect_numel(kv_b, T * heads * (dn + dv), op, "kv_b");
  expect_numel(k_rope, T * dr, op, "k_rope");
  expect_numel(k, T * heads * (dn + dr), op, "k");
  expect_numel(v, T * heads * dv, op, "v");
  check(cuda::mla_split_kv(k.raw(), v.raw(), k.dtype(), kv_b.raw(), kv_b.dtype(), k_rope.f32(), T,
                           heads, dn, dr, dv),
        op);
}

// Under the Bf16 precision with BF16 k and v: each head's k_nope and v columns come straight out
// of two strided-batched GEMMs (one problem per head: C_h [T, dn] at k + h (dn + dr), leading
// dimension H (dn + dr), from W_kv_b's rows of that head; v alike), and a row kernel writes the
// shared k_rope beside them. That skips the kv_b tensor and the split's pass over it: for V2-Lite
// at 8192 tokens 67 MB written and read again, 72 us per layer on the H200 (the GEMMs' products
// are the same, rounded once as stored). Anything else: the GEMM and mla_split_kv.
void CudaBackend::mla_kv_up(Tensor& k, Tensor& v, const Tensor& kv_latent, const Tensor& w_kv_b,
                            const Tensor& k_rope, int64_t heads, int64_t dn, int64_t dr,
                            int64_t dv) {
  const char* op = "mla_kv_up";
  if (precision_ != Precision::Bf16 || k.dtype() != DType::BF16)
    return Backend::mla_kv_up(k, v, kv_latent, w_kv_b, k_rope, heads, dn, dr, dv);
  const int64_t T = rows(kv_latent), r = cols(kv_latent);
  expect(v, DType::BF16, op, "v");
  expect_f32(k_rope, op, "k_rope");
  expect_f32_or_bf16(kv_latent, op, "kv_latent");
  expect_f32_or_bf16(w_kv_b, op, "w_kv_b");
  expect_numel(w_kv_b, heads * (dn + dv) * r, op, "w_kv_b");
  expect_numel(k, T * heads * (dn + dr), op, "k");
  expect_numel(v, T * heads * dv, op, "v");
  expect_numel(k_rope, T * dr, op, "k_rope");
  if (T == 0 || heads == 0) return;
  const Tensor x = as_bf16(kv_latent), w = as_bf16(w_kv_b);  // alive until the GEMMs are queued
  const auto* w16 = static_cast<const uint16_t*>(w.raw());
  const GemmOperand a{x.raw(), DType::BF16, r, 0, false};
  const int64_t w_stride = (dn + dv) * r;  // one head's rows of W_kv_b
  gemm_batched(k.raw(), DType::BF16, heads * (dn + dr), dn + dr, a,
               {w16, DType::BF16, r, w_stride, true}, T, dn, r, heads, 1.0f, 0.0f);
  gemm_batched(v.raw(), DType::BF16, heads * dv, dv, a,
               {w16 + dn * r, DType::BF16, r, w_stride, true}, T, dv, r, heads, 1.0f, 0.0f);
  check(cuda::mla_broadcast_k_rope(k.raw(), DType::BF16, k_rope.f32(), T, heads, dn, dr), op);
}

void CudaBackend::mla_split_kv_backward(Tensor& dkv_b, Tensor& dk_rope, const Tensor& dk,
                                        const Tensor& dv, int64_t heads, int64_t dn, int64_t dr,
                                        int64_t dvd) {
  const char* op = "mla_split_kv_backward";
  const int64_t T = rows(dkv_b);
  expect_all_f32({&dk_rope, &dk, &dv}, op);
  expect_f32_or_bf16(dkv_b, op, "dkv_b");
  expect_numel(dkv_b, T * heads * (dn + dvd), op, "dkv_b");
  expect_numel(dk_rope, T * dr, op, "dk_rope");
  expect_numel(dk, T * heads * (dn + dr), op, "dk");
  expect_numel(dv, T * heads * dvd, op, "dv");
  check(cuda::mla_split_kv_backward(dkv_b.raw(), dkv_b.dtype(), dk_rope.f32(), dk.f32(), dv.f32(),
                                    T, heads, dn, dr, dvd),
        op);
}

namespace {

// As the CPU backend (architecture.md, "Gate"): normalise when norm_topk_prob and K > 1; the
// routed_scaling_factor applies unless a softmax gate normalises (V2); V3's sigmoid gate
// normalises and then scales.
cuda::GateLaunch gate_launch(const GateParams& p) {
  cuda::GateLaunch g;
  g.p = p;
  g.normalise = p.norm_topk_prob && p.top_k > 1;
  g.weight_scale =
      (!g.normalise || p.scoring == ScoringFunc::Sigmoid) ? p.routed_scaling_factor : 1.0f;
  return g;
}

}  // namespace

void CudaBackend::moe_gate_forward(Tensor& topk_idx, Tensor& topk_w, Tensor& scores,
                                   const Tensor& logits, const Tensor& bias, const GateParams& p) {
  const char* op = "moe_gate_forward";
  const int64_t T = rows(logits), E = p.n_experts, K = p.top_k;
  MOEKIT_CHECK(cols(logits) == E && p.n_group > 0 && E % p.n_group == 0 && K <= E &&
                   p.topk_group <= p.n_group,
               "gate shapes");
  expect(topk_idx, DType::I32, op, "topk_idx");
  expect_f32(topk_w, op, "topk_w");
  expect_f32(scores, op, "scores");
  expect_f32(logits, op, "logits");
  expect_numel(topk_idx, T * K, op, "topk_idx");
  expect_numel(topk_w, T * K, op, "topk_w");
  expect_numel(scores, T * E, op, "scores");
  if (bias.defined()) {
    expect_f32(bias, op, "bias");
    expect_numel(bias, E, op, "bias");
  }
  check(cuda::moe_gate_forward(topk_idx.i32(), topk_w.f32(), scores.f32(), logits.f32(),
                               bias.defined() ? bias.f32() : nullptr, gate_launch(p), T),
        op);
}

void CudaBackend::moe_gate_backward(Tensor& dlogits, const Tensor& dtopk_w, const Tensor& topk_idx,
                                    const Tensor& scores, const Tensor& dscores,
                                    const GateParams& p) {
  const char* op = "moe_gate_backward";
  const int64_t T = rows(scores), E = p.n_experts, K = p.top_k;
  expect_f32(dlogits, op, "dlogits");
  expect_f32(dtopk_w, op, "dtopk_w");
  expect(topk_idx, DType::I32, op, "topk_idx");
  expect_f32(scores, op, "scores");
  expect_numel(dlogits, T * E, op, "dlogits");
  expect_numel(dtopk_w, T * K, op, "dtopk_w");
  expect_numel(topk_idx, T * K, op, "topk_idx");
  if (dscores.defined()) {
    expect_f32(dscores, op, "dscores");
    expect_numel(dscores, T * E, op, "dscores");
  }
  check(cuda::moe_gate_backward(dlogits.f32(), dtopk_w.f32(), topk_idx.i32(), scores.f32(),
                                dscores.defined() ? dscores.f32() : nullptr, gate_launch(p), T),
        op);
}

void CudaBackend::adamw_step(Tensor& w, Tensor& m, Tensor& v, const Tensor& g, const AdamWStep& s,
                             Tensor* w_bf16) {
  const char* op = "adamw_step";
  expect_all_f32({&w, &m, &v, &g}, op);
  const int64_t n = w.numel();
  expect_numel(m, n, op, "m");
  expect_numel(v, n, op, "v");
  expect_numel(g, n, op, "g");
  if (w_bf16) {
    cuda::expect(*w_bf16, DType::BF16, op, "w_bf16");
    expect_numel(*w_bf16, n, op, "w_bf16");
  }
  check(
      cuda::adamw_step(w.f32(), m.f32(), v.f32(), g.f32(), w_bf16 ? w_bf16->raw() : nullptr, n, s),
      op);
}

double CudaBackend::sum_squares(const Tensor& x) {
  const char* op = "sum_squares";
  expect_f32(x, op, "x");
  const int64_t n = x.numel();
  if (n == 0) return 0.0;
  // Doubles as pairs of I32 slots: one for the result, then the block partials.
  Tensor buf = scratch({2 * (1 + cuda::sum_squares_blocks(n))}, DType::I32);
  double* d = static_cast<double*>(buf.raw());
  check(cuda::sum_squares(d, d + 1, x.f32(), n), op);
  double out = 0.0;
  check(cudaMemcpy(&out, d, sizeof(double), cudaMemcpyDeviceToHost), op);
  raise_index_errors();
  return out;
}

}  // namespace moekit
