// The one dispatch point from a device to its backend. The CUDA backend registers here when it
// is compiled in (MOEKIT_HAVE_CUDA); otherwise asking for it is a clear error. Also the shape
// checks that every backend runs alike (ops.h's *_dims functions), so errors read the same.
#include <algorithm>

#include "core/error.h"
#include "ops/cpu/cpu_backend.h"
#include "ops/cpu/cpu_util.h"
#include "ops/ops.h"

namespace moekit {

#ifdef MOEKIT_HAVE_CUDA
Backend* cuda_backend();  // ops/cuda; null when no GPU is present
#endif

Backend& backend(Device device) {
  if (device == Device::CPU) {
    static CpuBackend cpu;
    return cpu;
  }
#ifdef MOEKIT_HAVE_CUDA
  if (Backend* b = cuda_backend()) return *b;
  fail("no CUDA device found (moekit was built with CUDA, but no GPU is visible)");
#else
  fail("this moekit was built without CUDA (rebuild with a CUDA toolkit and -DMOEKIT_CUDA=ON)");
#endif
}

std::unique_ptr<PendingHostCopy> Backend::copy_to_host_async(const Tensor& src) {
  struct Done final : PendingHostCopy {
    Tensor host;
    Tensor wait() override { return host; }
  };
  auto done = std::make_unique<Done>();
  done->host = src.to_host();
  return done;
}

void Backend::matmul_pair(Tensor& y0, Tensor& y1, const Tensor& x, const Tensor& w0,
                          const Tensor& w1) {
  MOEKIT_CHECK(y0.shape() == y1.shape() && y0.dtype() == y1.dtype() && w0.shape() == w1.shape() &&
                   w0.dtype() == w1.dtype(),
               "matmul_pair: outputs {} ({}), {} ({}); weights {} ({}), {} ({})", y0.shape().str(),
               dtype_name(y0.dtype()), y1.shape().str(), dtype_name(y1.dtype()), w0.shape().str(),
               dtype_name(w0.dtype()), w1.shape().str(), dtype_name(w1.dtype()));
  matmul(y0, x, w0, false, true, 1.0f, 0.0f);
  matmul(y1, x, w1, false, true, 1.0f, 0.0f);
}

void Backend::combine_slots(Tensor& out, const Tensor& x, const Tensor& slot_token,
                            const Tensor& token_slots, const Tensor* weights) {
  MOEKIT_CHECK(token_slots.dtype() == DType::I32 && token_slots.ndim() == 2 &&
                   token_slots.dim(0) == out.dim(0),
               "combine_slots: token_slots {} {} for out {}", dtype_name(token_slots.dtype()),
               token_slots.shape().str(), out.shape().str());
  scatter_add_rows(out, x, slot_token, weights);
}

void Backend::grouped_matmul_sum(Tensor& c, std::span<const GroupedTerm> terms,
                                 std::span<const int64_t> begin, bool trans_b, float beta) {
  MOEKIT_CHECK(!terms.empty(), "grouped_matmul_sum: no terms");
  for (size_t t = 0; t < terms.size(); ++t) {
    MOEKIT_CHECK(terms[t].a, "grouped_matmul_sum: term {} has no rows", t);
    grouped_matmul(c, *terms[t].a, terms[t].b, begin, trans_b, t == 0 ? beta : 1.0f);
  }
}

void Backend::mla_kv_a_split(Tensor& kv_latent, Tensor& rstd, Tensor& k_rope, const Tensor& kv_a,
                             const Tensor& norm_w, float eps, const Tensor& cos, const Tensor& sin,
                             const Tensor& positions) {
  const int64_t T = rows(kv_a), r = cols(kv_latent), dr = cols(k_rope);
  if (kv_a.ndim() != 2 || cols(kv_a) != r + dr || rows(kv_latent) != T || rows(k_rope) != T)
    fail("mla_kv_a_split: kv_a {} does not split into kv_latent {} and k_rope {}",
         kv_a.shape().str(), kv_latent.shape().str(), k_rope.shape().str());
  Tensor c_kv = Tensor::empty({T, r}, DType::F32, kv_a.device());
  copy_columns(c_kv, 0, kv_a, 0, r, false);
  copy_columns(k_rope, 0, kv_a, r, dr, false);
  rope(k_rope, k_rope, 1, dr, 0, dr, cos, sin, positions, false);
  rmsnorm_forward(kv_latent, rstd, c_kv, norm_w, eps);
}

void Backend::mla_kv_up(Tensor& k, Tensor& v, const Tensor& kv_latent, const Tensor& w_kv_b,
                        const Tensor& k_rope, int64_t heads, int64_t dn, int64_t dr, int64_t dv) {
  const bool bf16 = k.dtype() == DType::BF16 && supports(Op::Matmul, DType::BF16);
  Tensor kv_b = Tensor::empty({rows(kv_latent), heads * (dn + dv)}, bf16 ? DType::BF16 : DType::F32,
                              kv_latent.device());
  matmul(kv_b, kv_latent, w_kv_b, false, true, 1.0f, 0.0f);
  mla_split_kv(k, v, kv_b, k_rope, heads, dn, dr, dv);
}

void Backend::grouped_swiglu(Tensor& h, Tensor* gate, Tensor* up, const Tensor& x,
                             std::span<const Tensor* const> gate_w,
                             std::span<const Tensor* const> up_w, std::span<const int64_t> begin) {
  MOEKIT_CHECK(gate_w.size() == up_w.size(), "grouped_swiglu: {} gate and {} up weights",
               gate_w.size(), up_w.size());
  for (const Tensor* t : {gate, up})
    MOEKIT_CHECK(!t || (t->shape() == h.shape() && t->dtype() == h.dtype()),
                 "grouped_swiglu: a product {} ({}) for h {} ({})", t->shape().str(),
                 dtype_name(t->dtype()), h.shape().str(), dtype_name(h.dtype()));
  Tensor g = gate ? *gate : Tensor::empty(h.shape(), h.dtype(), h.device());
  Tensor u = up ? *up : Tensor::empty(h.shape(), h.dtype(), h.device());
  grouped_matmul(g, x, gate_w, begin, true, 0.0f);
  grouped_matmul(u, x, up_w, begin, true, 0.0f);
  swiglu_forward(h, g, u);
}

void Backend::grouped_weight_grad(std::span<Tensor* const> dw, const Tensor& dy, const Tensor& x,
                                  std::span<const int64_t> begin) {
  grouped_weight_grad_dims(dw, dy, x, begin);
  for (size_t g = 0; g < dw.size(); ++g) {
    if (!dw[g] || begin[g] == begin[g + 1]) continue;
    matmul(*dw[g], dy.slice(begin[g], begin[g + 1]), x.slice(begin[g], begin[g + 1]), true, false,
           1.0f, 1.0f);
  }
}

void Backend::cross_entropy_fused(Tensor& losses, Tensor& dlogits, const Tensor& logits,
                                  const Tensor& targets, float scale) {
  // Forward first: in place, the backward overwrites the logits the forward reads.
  cross_entropy_forward(losses, logits, targets);
  cross_entropy_backward(dlogits, logits, targets, scale);
}

MatmulDims matmul_dims(const Tensor& c, const Tensor& a, const Tensor& b, bool trans_a,
                       bool trans_b) {
  const MatmulDims d{rows(c), cols(c), trans_a ? rows(a) : cols(a)};
  MOEKIT_CHECK((trans_a ? cols(a) : rows(a)) == d.M, "matmul: a {} vs c {}", a.shape().str(),
               c.shape().str());
  MOEKIT_CHECK((trans_b ? rows(b) : cols(b)) == d.N && (trans_b ? cols(b) : rows(b)) == d.K,
               "matmul: b {} vs a {} c {}", b.shape().str(), a.shape().str(), c.shape().str());
  return d;
}

GroupedMatmulDims grouped_matmul_dims(const Tensor& c, const Tensor& a,
                                      std::span<const Tensor* const> b,
                                      std::span<const int64_t> begin, bool trans_b) {
  MOEKIT_CHECK(begin.size() == b.size() + 1, "grouped_matmul: {} offsets for {} groups",
               begin.size(), b.size());
  MOEKIT_CHECK(begin.front() == 0 && begin.back() == rows(a) && rows(c) == rows(a),
               "grouped_matmul: groups cover [{}, {}), a {} c {}", begin.front(), begin.back(),
               a.shape().str(), c.shape().str());
  const GroupedMatmulDims d{cols(c), cols(a)};
  for (size_t g = 0; g < b.size(); ++g) {
    MOEKIT_CHECK(begin[g] <= begin[g + 1], "grouped_matmul: offsets decrease at group {}", g);
    if (begin[g] == begin[g + 1]) continue;
    MOEKIT_CHECK(b[g] && b[g]->defined(), "grouped_matmul: group {} has rows but no weight", g);
    const Tensor& w = *b[g];
    MOEKIT_CHECK(w.ndim() == 2 && (trans_b ? rows(w) : cols(w)) == d.N &&
                     (trans_b ? cols(w) : rows(w)) == d.K,
                 "grouped_matmul: weight {} is {} vs a {} c {}", g, w.shape().str(),
                 a.shape().str(), c.shape().str());
  }
  return d;
}

GroupedMatmulDims grouped_weight_grad_dims(std::span<Tensor* const> dw, const Tensor& dy,
                                           const Tensor& x, std::span<const int64_t> begin) {
  MOEKIT_CHECK(begin.size() == dw.size() + 1, "grouped_weight_grad: {} offsets for {} groups",
               begin.size(), dw.size());
  MOEKIT_CHECK(dy.ndim() == 2 && x.ndim() == 2, "grouped_weight_grad: dy {} x {} (2-D expected)",
               dy.shape().str(), x.shape().str());
  MOEKIT_CHECK(begin.front() == 0 && begin.back() == rows(dy) && rows(x) == rows(dy),
               "grouped_weight_grad: groups cover [{}, {}), dy {} x {}", begin.front(),
               begin.back(), dy.shape().str(), x.shape().str());
  const GroupedMatmulDims d{cols(dy), cols(x)};
  for (size_t g = 0; g < dw.size(); ++g) {
    MOEKIT_CHECK(begin[g] <= begin[g + 1], "grouped_weight_grad: offsets decrease at group {}", g);
    // Every gradient given is checked, rows or not: a wrong one is a bug even when idle.
    if (!dw[g]) continue;
    MOEKIT_CHECK(
        dw[g]->defined() && dw[g]->dtype() == DType::F32 && dw[g]->shape() == Shape({d.N, d.K}),
        "grouped_weight_grad: dw {} is {} {} vs dy {} x {} (F32 [{}, {}] expected)", g,
        dw[g]->defined() ? dtype_name(dw[g]->dtype()) : "undefined", dw[g]->shape().str(),
        dy.shape().str(), x.shape().str(), d.N, d.K);
  }
  return d;
}

void check_gemm_batch(const Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b,
                      const GemmBatch& g) {
  MOEKIT_CHECK(g.count >= 0 && g.m >= 0 && g.n >= 0 && g.k >= 0,
               "matmul_batched: negative dims (count {}, m {}, n {}, k {})", g.count, g.m, g.n,
               g.k);
  // A stored operand is [rows, cols] with row length ld; block count - 1 must end inside.
  auto inside = [&](const Tensor& t, const char* name, int64_t r, int64_t cl, int64_t ld,
                    int64_t stride) {
    MOEKIT_CHECK(ld >= cl && stride >= 0, "matmul_batched: {} has ld {} < {} columns", name, ld,
                 cl);
    if (g.count == 0 || r == 0 || cl == 0) return;
    const int64_t last = (g.count - 1) * stride + (r - 1) * ld + cl;
    MOEKIT_CHECK(last <= t.numel(), "matmul_batched: {} blocks reach element {} of {} ({})", name,
                 last, t.numel(), t.shape().str());
  };
  inside(a, "a", trans_a ? g.k : g.m, trans_a ? g.m : g.k, g.lda, g.stride_a);
  inside(b, "b", trans_b ? g.n : g.k, trans_b ? g.k : g.n, g.ldb, g.stride_b);
  inside(c, "c", g.m, g.n, g.ldc, g.stride_c);
}

MoeExpertsSmallDims moe_experts_small_dims(const Tensor& y, const Tensor& x, const Tensor& topk_idx,
                                           const Tensor& topk_w,
                                           std::span<const ExpertWeights> experts,
                                           const ExpertWeights* shared) {
  MoeExpertsSmallDims d;
  MOEKIT_CHECK(x.ndim() == 2 && topk_idx.ndim() == 2 && !experts.empty(),
               "moe_experts_small: x {} topk_idx {} with {} experts", x.shape().str(),
               topk_idx.shape().str(), experts.size());
  d.T = x.dim(0);
  d.H = x.dim(1);
  d.K = topk_idx.dim(1);
  d.E = int64_t(experts.size());
  MOEKIT_CHECK(topk_idx.dim(0) == d.T && topk_idx.dtype() == DType::I32 &&
                   topk_w.numel() == d.T * d.K && y.numel() == d.T * d.H,
               "moe_experts_small: y {} x {} topk_idx {} ({}) topk_w {}", y.shape().str(),
               x.shape().str(), topk_idx.shape().str(), dtype_name(topk_idx.dtype()),
               topk_w.shape().str());
  for (size_t e = 0; e < experts.size(); ++e) {
    const ExpertWeights& w = experts[e];
    MOEKIT_CHECK(w.gate_proj && w.up_proj && w.down_proj && w.gate_proj->defined() &&
                     w.up_proj->defined() && w.down_proj->defined(),
                 "moe_experts_small: expert {} lacks a weight", e);
    if (e == 0) {
      d.I = w.gate_proj->ndim() == 2 ? w.gate_proj->dim(0) : 0;
      d.dtype = w.gate_proj->dtype();
    }
    const Shape in{d.I, d.H}, out{d.H, d.I};
    MOEKIT_CHECK(
        w.gate_proj->shape() == in && w.up_proj->shape() == in && w.down_proj->shape() == out,
        "moe_experts_small: expert {} has gate {} up {} down {}, expected [I, {}] and "
        "[{}, I] with one I",
        e, w.gate_proj->shape().str(), w.up_proj->shape().str(), w.down_proj->shape().str(), d.H,
        d.H);
    for (const Tensor* t : {w.gate_proj, w.up_proj, w.down_proj})
      MOEKIT_CHECK(t->dtype() == d.dtype, "moe_experts_small: expert {} mixes {} and {} weights", e,
                   dtype_name(d.dtype), dtype_name(t->dtype()));
  }
  if (shared) {  // one dense SwiGLU of its own width Is, in the routed experts' dtype
    const ExpertWeights& w = *shared;
    MOEKIT_CHECK(w.gate_proj && w.up_proj && w.down_proj && w.gate_proj->defined() &&
                     w.up_proj->defined() && w.down_proj->defined(),
                 "moe_experts_small: the shared experts lack a weight");
    d.Is = w.gate_proj->ndim() == 2 ? w.gate_proj->dim(0) : 0;
    const Shape in{d.Is, d.H}, out{d.H, d.Is};
    MOEKIT_CHECK(
        w.gate_proj->shape() == in && w.up_proj->shape() == in && w.down_proj->shape() == out,
        "moe_experts_small: shared experts have gate {} up {} down {}, expected [Is, {}] and "
        "[{}, Is] with one Is",
        w.gate_proj->shape().str(), w.up_proj->shape().str(), w.down_proj->shape().str(), d.H, d.H);
    for (const Tensor* t : {w.gate_proj, w.up_proj, w.down_proj})
      MOEKIT_CHECK(t->dtype() == d.dtype,
                   "moe_experts_small: shared experts with a {} weight next to {} routed experts",
                   dtype_name(t->dtype()), dtype_name(d.dtype));
  }
  return d;
}

LatentAttentionDims latent_attention_dims(const Tensor& ctx, const Tensor& q_lat,
                                          const Tensor& q_rope, const Tensor& kv_latent,
                                          const Tensor& k_rope, const Tensor& positions,
                                          int64_t heads) {
  LatentAttentionDims d;
  MOEKIT_CHECK(heads > 0 && positions.dtype() == DType::I32,
               "latent_attention: {} heads, positions {} ({})", heads, positions.shape().str(),
               dtype_name(positions.dtype()));
  MOEKIT_CHECK(kv_latent.ndim() == 2 && k_rope.ndim() == 2 && kv_latent.dim(0) == k_rope.dim(0) &&
                   kv_latent.dim(1) > 0,
               "latent_attention: kv_latent {} and k_rope {} must be [cap, r] and [cap, dr]",
               kv_latent.shape().str(), k_rope.shape().str());
  d.n = positions.numel();
  d.H = heads;
  d.cap = kv_latent.dim(0);
  d.r = kv_latent.dim(1);
  d.dr = k_rope.dim(1);
  auto rows_of = [&](const Tensor& t, int64_t width, const char* name) {
    MOEKIT_CHECK(t.numel() == d.n * d.H * width && cols(t) == width,
                 "latent_attention: {} is {}, expected [{} tokens x {} heads, {}]", name,
                 t.shape().str(), d.n, d.H, width);
  };
  rows_of(ctx, d.r, "ctx");
  rows_of(q_lat, d.r, "q_lat");
  if (d.dr > 0) rows_of(q_rope, d.dr, "q_rope");
  MOEKIT_CHECK(q_rope.numel() == d.n * d.H * d.dr, "latent_attention: q_rope {} for dr {}",
               q_rope.shape().str(), d.dr);
  return d;
}

bool rope_in_place(const Tensor& out, const Tensor& x, int64_t heads, int64_t head_stride,
                   int64_t offset, int64_t rope_dim, const Tensor& cos, const Tensor& sin,
                   const Tensor& positions) {
  const int64_t T = positions.numel(), half = rope_dim / 2;
  MOEKIT_CHECK(positions.dtype() == DType::I32 && x.numel() == T * heads * head_stride &&
                   out.numel() == x.numel(),
               "rope: x {}, out {}, positions {} ({}): expected {} x {} heads x {} elements each, "
               "positions I32",
               x.shape().str(), out.shape().str(), positions.shape().str(),
               dtype_name(positions.dtype()), T, heads, head_stride);
  MOEKIT_CHECK(offset >= 0 && rope_dim >= 0 && rope_dim % 2 == 0 &&
                   offset + rope_dim <= head_stride && cols(cos) == half && cols(sin) == half &&
                   rows(sin) == rows(cos),
               "rope: offset {} + rope_dim {} vs head_stride {}, table {} / {}", offset, rope_dim,
               head_stride, cos.shape().str(), sin.shape().str());
  // Same memory: the in-place rotation, which writes only the pairs, so out must be x, in x's
  // dtype. A BF16 out of an F32 x is a tensor of its own.
  const bool in_place = out.defined() && out.numel() > 0 && out.raw() == x.raw();
  MOEKIT_CHECK(!in_place || out.dtype() == x.dtype(),
               "rope: out is x's memory as {} (in place keeps x's dtype; a BF16 out is a tensor of "
               "its own)",
               dtype_name(out.dtype()));
  return in_place;
}

int64_t set_rows_dims(const Tensor& dst, const Tensor& src, const Tensor& rows_) {
  const int64_t D = cols(dst);
  MOEKIT_CHECK(dst.ndim() == 2 && rows_.dtype() == DType::I32 && cols(src) == D &&
                   src.numel() == rows_.numel() * D,
               "set_rows: dst {}, src {}, rows {} ({}): expected [R, D], [n, D], [n] I32",
               dst.shape().str(), src.shape().str(), rows_.shape().str(),
               dtype_name(rows_.dtype()));
  return D;
}

namespace {

// kv_b = W_kv_b [H*(dn+dv), r]: the weight both halves of the absorbed step read.
void check_kv_b(const Tensor& kv_b, const char* op, int64_t H, int64_t dn, int64_t dv, int64_t r) {
  MOEKIT_CHECK(kv_b.ndim() == 2 && kv_b.dim(0) == H * (dn + dv) && kv_b.dim(1) == r,
               "{}: kv_b {} is no [{} heads x ({} + {}), {}] weight", op, kv_b.shape().str(), H, dn,
               dv, r);
}

// The rope table [max_pos, dr/2] and positions I32 [n] of an op that rotates dr dims.
void check_rope_inputs(const Tensor& cos, const Tensor& sin, const Tensor& positions, int64_t n,
                       int64_t dr, const char* op) {
  MOEKIT_CHECK(dr % 2 == 0, "{}: rope dim {} is odd (rotated in pairs)", op, dr);
  MOEKIT_CHECK(cos.ndim() == 2 && cos.shape() == sin.shape() && cols(cos) == dr / 2,
               "{}: cos {} and sin {} must be [max_pos, {}]", op, cos.shape().str(),
               sin.shape().str(), dr / 2);
  MOEKIT_CHECK(positions.dtype() == DType::I32 && positions.numel() == n,
               "{}: positions {} ({}), expected I32 [{}]", op, positions.shape().str(),
               dtype_name(positions.dtype()), n);
}

}  // namespace

MlaStepDims mla_cache_write_dims(const Tensor& kv_latent, const Tensor& k_rope, const Tensor& kv_a,
                                 const Tensor& norm_w, const Tensor& cos, const Tensor& sin,
                                 const Tensor& positions) {
  const char* op = "mla_cache_write";
  MlaStepDims d;
  MOEKIT_CHECK(kv_latent.ndim() == 2 && k_rope.ndim() == 2 && kv_latent.dim(0) == k_rope.dim(0),
               "{}: kv_latent {} and k_rope {} must be [cap, r] and [cap, dr]", op,
               kv_latent.shape().str(), k_rope.shape().str());
  d.cap = kv_latent.dim(0);
  d.r = kv_latent.dim(1);
  d.dr = k_rope.dim(1);
  d.H = 1;
  MOEKIT_CHECK(kv_a.ndim() == 2 && kv_a.dim(1) == d.r + d.dr, "{}: kv_a {}, expected [n, {} + {}]",
               op, kv_a.shape().str(), d.r, d.dr);
  d.n = kv_a.dim(0);
  MOEKIT_CHECK(norm_w.numel() == d.r, "{}: norm weight {} for rank {}", op, norm_w.shape().str(),
               d.r);
  check_rope_inputs(cos, sin, positions, d.n, d.dr, op);
  d.limit = std::min(d.cap, rows(cos));
  return d;
}

MlaStepDims mla_absorb_query_dims(const Tensor& q_lat, const Tensor& q_rope, const Tensor& q,
                                  const Tensor& kv_b, const Tensor& cos, const Tensor& sin,
                                  const Tensor& positions, int64_t heads, int64_t dn, int64_t dr,
                                  int64_t dv) {
  const char* op = "mla_absorb_query";
  MlaStepDims d;
  MOEKIT_CHECK(heads > 0 && dn >= 0 && dr >= 0 && dv >= 0, "{}: {} heads, dn {} dr {} dv {}", op,
               heads, dn, dr, dv);
  d.H = heads;
  d.dr = dr;
  d.r = cols(kv_b);
  check_kv_b(kv_b, op, heads, dn, dv, d.r);
  MOEKIT_CHECK(q.ndim() == 2 && q.dim(1) == heads * (dn + dr),
               "{}: q {}, expected [n, {} heads x ({} + {})]", op, q.shape().str(), heads, dn, dr);
  d.n = q.dim(0);
  MOEKIT_CHECK(q_lat.numel() == d.n * heads * d.r && cols(q_lat) == d.r,
               "{}: q_lat {}, expected [{} tokens x {} heads, {}]", op, q_lat.shape().str(), d.n,
               heads, d.r);
  MOEKIT_CHECK(q_rope.numel() == d.n * heads * dr && (dr == 0 || cols(q_rope) == dr),
               "{}: q_rope {}, expected [{} tokens x {} heads, {}]", op, q_rope.shape().str(), d.n,
               heads, dr);
  check_rope_inputs(cos, sin, positions, d.n, dr, op);
  d.limit = rows(cos);
  return d;
}

MlaStepDims mla_value_heads_dims(const Tensor& o, const Tensor& ctx, const Tensor& kv_b,
                                 int64_t heads, int64_t dn, int64_t dv) {
  const char* op = "mla_value_heads";
  MlaStepDims d;
  MOEKIT_CHECK(heads > 0 && dn >= 0 && dv > 0, "{}: {} heads, dn {} dv {}", op, heads, dn, dv);
  d.H = heads;
  d.r = cols(kv_b);
  check_kv_b(kv_b, op, heads, dn, dv, d.r);
  MOEKIT_CHECK(o.ndim() == 2 && o.dim(1) == heads * dv, "{}: o {}, expected [n, {} heads x {}]", op,
               o.shape().str(), heads, dv);
  d.n = o.dim(0);
  MOEKIT_CHECK(ctx.numel() == d.n * heads * d.r && cols(ctx) == d.r,
               "{}: ctx {}, expected [{} tokens x {} heads, {}]", op, ctx.shape().str(), d.n, heads,
               d.r);
  return d;
}

bool backend_available(Device device) {
  if (device == Device::CPU) return true;
#ifdef MOEKIT_HAVE_CUDA
  return cuda_backend() != nullptr;
#else
  return false;
#endif
}

}  // namespace moekit
