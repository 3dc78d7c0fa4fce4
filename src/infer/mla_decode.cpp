// Absorbed MLA attention over the latent cache (GEMMs through the backend; the causal softmax on
// the host, so on a GPU the scores make a round trip per head).
#include "infer/mla_decode.h"

#include <cmath>
#include <limits>
#include <vector>

#include "nn/linear.h"

namespace moekit {

Tensor mla_decode(Backend& be, MLA& a, const Tensor& x, const Tensor& positions,
                  const RopeTable& rope, LayerCache& cache, int64_t cached) {
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
  Tensor latent = a.kv_a_layernorm.forward(be, c_kv);
  Tensor dst = cache.kv_latent.slice(cached, total);
  dst.copy_from(latent);

  const Tensor C = cache.kv_latent.slice(0, total), KR = cache.k_rope.slice(0, total);
  Tensor o = empty({n, H * dv});
  Tensor q_nope = empty({n, dn}), q_rope = empty({n, dr}), q_lat = empty({n, r});
  Tensor scores = empty({n, total}), ctx = empty({n, r}), o_h = empty({n, dv});
  const Tensor& w = a.kv_b_proj->value;  // [H*(dn+dv), r]
  for (int64_t h = 0; h < H; ++h) {
    be.copy_columns(q_nope, 0, q, h * dqk, dn, false);
    be.copy_columns(q_rope, 0, q, h * dqk + dn, dr, false);
    const Tensor w_k = w.slice(h * (dn + dv), h * (dn + dv) + dn);        // [dn, r]
    const Tensor w_v = w.slice(h * (dn + dv) + dn, (h + 1) * (dn + dv));  // [dv, r]
    be.matmul(q_lat, q_nope, w_k, false, false, 1.0f, 0.0f);              // absorb W_kb
    be.matmul(scores, q_lat, C, false, true, a.softmax_scale, 0.0f);
    be.matmul(scores, q_rope, KR, false, true, a.softmax_scale, 1.0f);
    // Causal softmax on the host (row i sees cache positions <= cached + i); device scores take
    // a round trip (n x total values per head: small next to the weights a step reads).
    Tensor sh = scores.to_host();
    for (int64_t i = 0; i < n; ++i) {
      float* s = sh.f32() + i * total;
      const int64_t last = cached + i;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j <= last; ++j) m = std::max(m, s[j]);
      float z = 0.0f;
      for (int64_t j = 0; j <= last; ++j) z += (s[j] = std::exp(s[j] - m));
      for (int64_t j = 0; j < total; ++j) s[j] = j <= last ? s[j] / z : 0.0f;
    }
    if (sh.device() != scores.device()) scores.copy_from(sh);
    be.matmul(ctx, scores, C, false, false, 1.0f, 0.0f);  // sum_j p_j c_j
    be.matmul(o_h, ctx, w_v, false, true, 1.0f, 0.0f);    // apply W_vb after attention
    be.copy_columns(o, h * dv, o_h, 0, dv, false);
  }
  Tensor y = empty({n, x.dim(1)});
  linear_forward(be, y, o, *a.o_proj);
  return y;
}

}  // namespace moekit
