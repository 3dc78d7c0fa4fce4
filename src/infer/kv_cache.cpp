// KV cache allocation.
#include "infer/kv_cache.h"

namespace moekit {

KVCache KVCache::create(const ModelConfig& c, int64_t capacity, Device device) {
  KVCache kv;
  kv.capacity = capacity;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    kv.layers.push_back({Tensor::zeros({capacity, c.kv_lora_rank}, DType::F32, device),
                         Tensor::zeros({capacity, c.qk_rope_head_dim}, DType::F32, device)});
  return kv;
}

size_t KVCache::bytes() const {
  size_t n = 0;
  for (const auto& l : layers) n += l.kv_latent.nbytes() + l.k_rope.nbytes();
  return n;
}

}  // namespace moekit
