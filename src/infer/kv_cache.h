// MLA's compressed KV cache: per layer only the normalised latent c_kv (kv_lora_rank values) and
// the roped k_rope (qk_rope_head_dim values) of each past token: 576 values per token and layer
// for V2/V3 instead of 2 * heads * head_dim for ordinary multi-head attention.
#pragma once

#include <vector>

#include "core/tensor.h"
#include "model/config.h"

namespace moekit {

struct LayerCache {
  Tensor kv_latent;  // [capacity, kv_lora_rank]
  Tensor k_rope;     // [capacity, qk_rope_head_dim]
};

struct KVCache {
  std::vector<LayerCache> layers;
  int64_t length = 0;  // tokens cached
  int64_t capacity = 0;

  static KVCache create(const ModelConfig& c, int64_t capacity, Device device);
  size_t bytes() const;
};

}  // namespace moekit
