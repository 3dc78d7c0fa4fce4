// Absorbed MLA attention over the latent cache: every step is a backend op (GEMMs, batched per-head
// GEMMs, the causal softmax), so on a GPU nothing waits for the host.
#include "infer/mla_decode.h"

#include <algorithm>

#include "nn/linear.h"

namespace moekit {

Tensor mla_decode(Backend& be, MLA& a, const Tensor& x, const Tensor& positions,
                  const RopeTable& rope, LayerCache& cache, int64_t cached, int64_t max_scores) {
  const int64_t n = x.dim(0), H = a.heads, dn = a.dn, dr = a.dr, dv = a.dv, r = a.kv_lora_rank;
  const int64_t dqk = dn + dr, total = cached + n;
  auto empty = [&](Shape s) { return Tensor::empty(s, DType::F32, x.device()); };

  Tensor q = empty({n, H * dqk});
  if (a.q_lora_rank > 0) {
    Tensor qa = empty({n, a.q_lora_rank});
    linear_forward(be, qa, x, *a.q_a_proj);
    linear_forward(be, q, a.q_a_layernorm.forward(be, qa), *a.q_b_proj);
  } else {
    linear_forward(be, q, x, *a.q_proj);
  }
  be.rope(q, H, dqk, dn, dr, rope.cos, rope.sin, positions, false);

  Tensor kv_a = empty({n, r + dr});
  linear_forward(be, kv_a, x, *a.kv_a_proj_with_mqa);
  Tensor c_kv = empty({n, r}), k_rope = cache.k_rope.slice(cached, total);
  be.copy_columns(c_kv, 0, kv_a, 0, r, false);
  be.copy_columns(k_rope, 0, kv_a, r, dr, false);
  be.rope(k_rope, 1, dr, 0, dr, rope.cos, rope.sin, positions, false);
  Tensor latent = cache.kv_latent.slice(cached, total), rstd = empty({n});  // into the cache
  be.rmsnorm_forward(latent, rstd, c_kv, a.kv_a_layernorm.weight->value, a.kv_a_layernorm.eps);

  // All heads at once; rows of q_lat, q_rope, scores and ctx are (token i, head h) pairs, i.e.
  // [n, H, ...] seen as [n*H, ...]. The latent cache C and k_rope are shared by every head, so
  // the scores are two plain GEMMs; only W_kb and W_vb differ per head (batched GEMMs over the
  // head blocks of q, W_kv_b and o).
  const Tensor C = cache.kv_latent.slice(0, total), KR = cache.k_rope.slice(0, total);
  const Tensor& w = a.kv_b_proj->value;  // [H*(dn+dv), r]: per head [W_kb (dn rows) | W_vb (dv)]
  Tensor q_lat = empty({n * H, r});
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
  be.matmul_batched(q_lat, q, w, false, false, 1.0f, 0.0f, absorb);
  Tensor q_rope = empty({n * H, dr});
  be.copy_columns(q_rope, 0, q.reshape({n * H, dqk}), dn, dr, false);
  // Scores in chunks of tokens, so that a long prompt never holds all n*H x total scores at once;
  // a decode step (n = 1) is one chunk. Chunk [i0, i1) sees the first cached + i1 positions.
  const int64_t chunk = std::max<int64_t>(1, max_scores / (H * total));
  Tensor ctx = empty({n * H, r});
  for (int64_t i0 = 0; i0 < n; i0 += chunk) {
    const int64_t i1 = std::min(n, i0 + chunk), seen = cached + i1;
    const Tensor Cs = C.slice(0, seen), KRs = KR.slice(0, seen);
    Tensor scores = empty({(i1 - i0) * H, seen}), ctx_c = ctx.slice(i0 * H, i1 * H);
    be.matmul(scores, q_lat.slice(i0 * H, i1 * H), Cs, false, true, a.softmax_scale, 0.0f);
    be.matmul(scores, q_rope.slice(i0 * H, i1 * H), KRs, false, true, a.softmax_scale, 1.0f);
    be.causal_softmax(scores, H, cached + i0 + 1);  // token i sees cache positions <= cached + i
    be.matmul(ctx_c, scores, Cs, false, false, 1.0f, 0.0f);  // sum_j p_j c_j
  }
  Tensor o = empty({n, H * dv});
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
  Tensor y = empty({n, x.dim(1)});
  linear_forward(be, y, o, *a.o_proj);
  return y;
}

}  // namespace moekit
