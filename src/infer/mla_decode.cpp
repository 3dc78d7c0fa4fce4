// Absorbed MLA attention over the latent cache: every step is a backend op, so on a GPU nothing
// waits for the host. The prompt path (mla_decode) is built from general ops (GEMMs, batched
// per-head GEMMs, the softmax), which suit many tokens; the step path (mla_decode_step) from the
// fused decode ops (cache write, query absorption, latent attention, value heads), because a
// batch-1 step is bound by its number of launches (mla_decode.h says why there are two paths).
#include "infer/mla_decode.h"

#include <algorithm>

#include "nn/linear.h"

namespace moekit {

namespace {

// An F32 tensor on `like`'s device.
Tensor empty_on(Shape s, const Tensor& like) {
  return Tensor::empty(s, DType::F32, like.device());
}

// q [n, H*(dn+dr)] of tokens x, per head [q_nope | q_pe], not yet roped; `first` (when defined)
// is q_proj's output (q_a_proj's with q-LoRA), already computed.
Tensor query(Backend& be, MLA& a, const Tensor& x, const Tensor& first = Tensor()) {
  const int64_t n = x.dim(0);
  Tensor q = empty_on({n, a.heads * (a.dn + a.dr)}, x);
  if (a.q_lora_rank > 0) {
    Tensor qa = first;
    if (!qa.defined()) {
      qa = empty_on({n, a.q_lora_rank}, x);
      linear_forward(be, qa, x, *a.q_a_proj);
    }
    linear_forward(be, q, a.q_a_layernorm.forward(be, qa), *a.q_b_proj);
  } else if (first.defined()) {
    return first;
  } else {
    linear_forward(be, q, x, *a.q_proj);
  }
  return q;
}

// The outputs of the projections that read the layer input: q_proj's (q_a_proj's with q-LoRA)
// and kv_a's [n, r + dr]. One GEMM over MLA::input_projections when it still holds both weights
// and there is one token (whose output row splits into the two without a copy); else two.
struct InputProjections {
  Tensor first, kv_a;
};
InputProjections input_projections(Backend& be, MLA& a, const Tensor& x) {
  const int64_t n = x.dim(0), kv_cols = a.kv_lora_rank + a.dr;
  const Param* first = a.q_lora_rank > 0 ? a.q_a_proj : a.q_proj;
  if (n == 1 && rows_of(a.input_projections, {first, a.kv_a_proj_with_mqa})) {
    const int64_t cols = a.input_projections.dim(0), first_cols = cols - kv_cols;
    Tensor both = empty_on({cols}, x);
    Tensor as_row = both.reshape({1, cols});
    be.matmul(as_row, x, a.input_projections, false, true, 1.0f, 0.0f);
    return {both.slice(0, first_cols).reshape({1, first_cols}),
            both.slice(first_cols, cols).reshape({1, kv_cols})};
  }
  InputProjections out{Tensor(), empty_on({n, kv_cols}, x)};
  linear_forward(be, out.kv_a, x, *a.kv_a_proj_with_mqa);
  return out;
}

// The absorbed query of tokens x at `positions`. Rows of both outputs are (token i, head h) pairs,
// i.e. [n, H, ...] seen as [n*H, ...]: q_lat [n*H, r] = W_kb_h^T q_nope (so scores against the
// latent cache need no per-head keys), q_rope [n*H, dr] the roped part.
struct LatentQuery {
  Tensor lat, rope;
};
LatentQuery latent_query(Backend& be, MLA& a, const Tensor& x, const Tensor& positions,
                         const RopeTable& rope) {
  const int64_t n = x.dim(0), H = a.heads, dn = a.dn, dr = a.dr, dv = a.dv, r = a.kv_lora_rank;
  const int64_t dqk = dn + dr;
  Tensor q = query(be, a, x);
  be.rope(q, q, H, dqk, dn, dr, rope.cos, rope.sin, positions, false);
  // Only W_kb differs per head: a batched GEMM over the head blocks of q and W_kv_b
  // ([H*(dn+dv), r], per head [W_kb (dn rows) | W_vb (dv rows)]).
  LatentQuery out{empty_on({n * H, r}, x), empty_on({n * H, dr}, x)};
  // q_lat_h [n, r] = q_nope_h [n, dn] @ W_kb_h [dn, r]
  const GemmBatch absorb{.count = H,
                         .m = n,
                         .n = r,
                         .k = dn,
                         .lda = H * dqk,
                         .ldb = r,
                         .ldc = H * r,
                         .stride_a = dqk,
                         .stride_b = (dn + dv) * r,
                         .stride_c = r};
  be.matmul_batched(out.lat, q, a.kv_b_proj->value, false, false, 1.0f, 0.0f, absorb);
  be.copy_columns(out.rope, 0, q.reshape({n * H, dqk}), dn, dr, false);
  return out;
}

// The cache entries of tokens x at `positions`: latent [n, r] = kv_a_layernorm(c_kv) and k_rope
// [n, dr] roped, written to the given tensors (cache rows or temporaries).
void latent_kv(Backend& be, MLA& a, const Tensor& x, const Tensor& positions, const RopeTable& rope,
               Tensor& latent, Tensor& k_rope) {
  const int64_t n = x.dim(0), dr = a.dr, r = a.kv_lora_rank;
  Tensor kv_a = empty_on({n, r + dr}, x);
  linear_forward(be, kv_a, x, *a.kv_a_proj_with_mqa);
  Tensor rstd = empty_on({n}, x);
  be.mla_kv_a_split(latent, rstd, k_rope, kv_a, a.kv_a_layernorm.weight->value,
                    a.kv_a_layernorm.eps, rope.cos, rope.sin, positions);
}

// y [n, hidden] from the attention context ctx [n*H, r]: W_vb per head, then o_proj.
Tensor latent_output(Backend& be, MLA& a, const Tensor& ctx, int64_t n, int64_t hidden) {
  const int64_t H = a.heads, dn = a.dn, dv = a.dv, r = a.kv_lora_rank;
  const Tensor& w = a.kv_b_proj->value;
  Tensor o = empty_on({n, H * dv}, ctx);
  // o_h [n, dv] = ctx_h [n, r] @ W_vb_h^T: W_vb applied after attention
  const GemmBatch value{.count = H,
                        .m = n,
                        .n = dv,
                        .k = r,
                        .lda = H * r,
                        .ldb = r,
                        .ldc = H * dv,
                        .stride_a = r,
                        .stride_b = (dn + dv) * r,
                        .stride_c = dv};
  be.matmul_batched(o, ctx, w.slice(dn, H * (dn + dv)), false, true, 1.0f, 0.0f, value);
  Tensor y = empty_on({n, hidden}, ctx);
  linear_forward(be, y, o, *a.o_proj);
  return y;
}

}  // namespace

Tensor mla_decode(Backend& be, MLA& a, const Tensor& x, const Tensor& positions,
                  const RopeTable& rope, LayerCache& cache, int64_t cached, int64_t max_scores) {
  const int64_t n = x.dim(0), H = a.heads, r = a.kv_lora_rank, total = cached + n;
  const LatentQuery q = latent_query(be, a, x, positions, rope);
  Tensor latent = cache.kv_latent.slice(cached, total), k_rope = cache.k_rope.slice(cached, total);
  latent_kv(be, a, x, positions, rope, latent, k_rope);  // straight into the cache

  // The latent cache C and k_rope are shared by every head, so the scores are two plain GEMMs.
  const Tensor C = cache.kv_latent.slice(0, total), KR = cache.k_rope.slice(0, total);
  // Scores in chunks of tokens, so that a long prompt never holds all n*H x total scores at once;
  // a decode step (n = 1) is one chunk. Chunk [i0, i1) sees the first cached + i1 positions.
  const int64_t chunk = std::max<int64_t>(1, max_scores / (H * total));
  Tensor ctx = empty_on({n * H, r}, x);
  for (int64_t i0 = 0; i0 < n; i0 += chunk) {
    const int64_t i1 = std::min(n, i0 + chunk), seen = cached + i1;
    const Tensor Cs = C.slice(0, seen), KRs = KR.slice(0, seen);
    Tensor scores = empty_on({(i1 - i0) * H, seen}, x), ctx_c = ctx.slice(i0 * H, i1 * H);
    be.matmul(scores, q.lat.slice(i0 * H, i1 * H), Cs, false, true, a.softmax_scale, 0.0f);
    be.matmul(scores, q.rope.slice(i0 * H, i1 * H), KRs, false, true, a.softmax_scale, 1.0f);
    be.causal_softmax(scores, H, cached + i0 + 1);  // token i sees cache positions <= cached + i
    be.matmul(ctx_c, scores, Cs, false, false, 1.0f, 0.0f);  // sum_j p_j c_j
  }
  return latent_output(be, a, ctx, n, x.dim(1));
}

void mla_decode_step(Backend& be, MLA& a, const Tensor& x, const Tensor& positions,
                     const RopeTable& rope, LayerCache& cache, Tensor& residual) {
  const int64_t n = x.dim(0), H = a.heads, r = a.kv_lora_rank;
  const Tensor& kv_b = a.kv_b_proj->value;  // W_kv_b, per head [W_kb | W_vb]
  // The new tokens' cache rows first (latent_attention reads each token's own row): kv_a_layernorm
  // and the rope of k_rope in the one launch that writes them at the device-side positions.
  const InputProjections in = input_projections(be, a, x);
  be.mla_cache_write(cache.kv_latent, cache.k_rope, in.kv_a, a.kv_a_layernorm.weight->value,
                     a.kv_a_layernorm.eps, rope.cos, rope.sin, positions);
  // The absorbed query (q_lat = W_kb^T q_nope) and the roped q_pe, one launch.
  const Tensor q = query(be, a, x, in.first);
  Tensor q_lat = empty_on({n * H, r}, x), q_rope = empty_on({n * H, a.dr}, x);
  be.mla_absorb_query(q_lat, q_rope, q, kv_b, rope.cos, rope.sin, positions, H, a.dn, a.dr, a.dv);
  // Over the whole cache buffers: the positions bound what each token sees.
  Tensor ctx = empty_on({n * H, r}, x);
  be.latent_attention(ctx, q_lat, q_rope, cache.kv_latent, cache.k_rope, positions, H,
                      a.softmax_scale);
  // W_vb after attention, then o_proj added straight into the residual stream (beta = 1: no
  // separate add).
  Tensor o = empty_on({n, H * a.dv}, x);
  be.mla_value_heads(o, ctx, kv_b, H, a.dn, a.dv);
  be.matmul(residual, o, a.o_proj->value, false, true, 1.0f, 1.0f);
}

}  // namespace moekit
