// MLA over the compressed cache with weight absorption (DeepSeek-V2 §2.1.3): the key half of
// W_kv_b is folded into the query (q_lat = W_kb^T q_nope) and the value half is applied after
// attention (o = W_vb * sum_j p_j c_j), so attention runs in the kv_lora_rank latent space and
// per-head keys/values are never materialised.
//
// Two entry points, one math (the same projections; the step path fuses the ops between them):
// - mla_decode, the prompt path: the host knows the cached length, so the scores are plain GEMMs
//   over exactly the rows seen, which suits many tokens at once (compute-bound).
// - mla_decode_step, the step path: nothing depends on a host-side length; the cache write and the
//   attention take the positions from device memory (Backend::mla_cache_write,
//   Backend::latent_attention), so the same launches serve every step and a decode step can be
//   captured once and replayed as a CUDA graph while the cache grows. A batch-1 step is bound by
//   its launches, so it uses the fused decode ops (ops.h) and few of them.
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

// The same for tokens x [n, hidden] (the attention's input, already normalised) at `positions`
// (I32 [n] on x's device, each < the cache's capacity): writes their latents to those cache rows,
// then token i attends to the rows [0, positions[i]], which must hold the earlier tokens. Adds the
// attention output to residual [n, hidden] (the o_proj GEMM accumulates with beta = 1, so the
// residual add is no launch of its own).
void mla_decode_step(Backend& be, MLA& attn, const Tensor& x, const Tensor& positions,
                     const RopeTable& rope, LayerCache& cache, Tensor& residual);

}  // namespace moekit
