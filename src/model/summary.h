// Parameter counts and memory estimates of a DeepSeek config, computed from the config alone
// (no weights needed), for `moekit info` and for "does it fit" checks before allocating.
#pragma once

#include <string>
#include <vector>

#include "model/config.h"

namespace moekit {

struct LayerSummary {
  int64_t index = 0;
  std::string ffn;  // "dense" or "moe"
  int64_t attention = 0, ffn_params = 0, ffn_active = 0, norms = 0;
};

struct ModelSummary {
  int64_t embedding = 0, lm_head = 0, final_norm = 0;
  std::vector<LayerSummary> layers;
  int64_t total = 0;               // every parameter
  int64_t active = 0;              // used per token (routed experts: only K of E)
  int64_t kv_cache_per_token = 0;  // values cached per token over all layers (MLA latent + k_rope)
};

ModelSummary summarize(const ModelConfig& c);

// "15.71B", "2.45M", ...
std::string human_count(double n);
std::string human_bytes(double n);

}  // namespace moekit
