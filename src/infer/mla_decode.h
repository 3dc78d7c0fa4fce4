// MLA over the compressed cache with weight absorption (DeepSeek-V2 §2.1.3): the key half of
// W_kv_b is folded into the query (q_lat = W_kb^T q_nope) and the value half is applied after
// attention (o = W_vb * sum_j p_j c_j), so attention runs in the kv_lora_rank latent space and
// per-head keys/values are never materialised.
#pragma once

#include "infer/kv_cache.h"
#include "nn/mla.h"

namespace moekit {

// x [n, hidden] are the next n tokens at positions cached .. cached + n - 1; appends their
// latents to `cache` (the caller advances its length) and returns y [n, hidden]. The attention
// scores of a long prompt are formed a chunk of tokens at a time, at most max_scores values.
Tensor mla_decode(Backend& be, MLA& attn, const Tensor& x, const Tensor& positions,
                  const RopeTable& rope, LayerCache& cache, int64_t cached,
                  int64_t max_scores = int64_t(1) << 24);

}  // namespace moekit
