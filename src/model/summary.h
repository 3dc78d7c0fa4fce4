// Parameter counts and memory estimates of a DeepSeek config, computed from the config alone
// (no weights needed), for `moekit info` and for "does it fit" checks before allocating.
#pragma once

#include <string>
#include <vector>

#include "core/tensor.h"
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

// Memory a run needs on its device, in bytes: fp32 weights, gradients and AdamW's two moments of
// the trainable parameters, and a rough estimate of the activations that forward keeps for
// backward over `tokens` tokens (batch x seq).
struct MemoryEstimate {
  double weights = 0, grads = 0, optimizer = 0, activations = 0;
  double total() const { return weights + grads + optimizer + activations; }
};
// `weights` BF16: frozen weights in bf16 (ParamTable's matrix dtype: the GEMM weights, the
// embedding and the LM head; the few frozen norm and router values, fp32 in fact, are counted at
// 2 bytes too), trainable ones in fp32 with a bf16 GEMM copy (6 bytes; the trainable norms have
// no copy but are few).
// Training (trainable_params > 0) runs the LM head and loss over chunks of 1024 tokens;
// `checkpointing` keeps each layer's input and one layer's activations; `recompute_experts` keeps
// the routed experts' rows of one layer only (DeepSeekModel::set_expert_recompute).
MemoryEstimate estimate_memory(const ModelConfig& c, int64_t tokens, int64_t trainable_params,
                               DType weights = DType::F32, bool checkpointing = false,
                               bool recompute_experts = false);

// Before allocating: fails with one line naming `what` when `device` lacks the memory (the GPU:
// free memory from the driver; the host: physical memory). Asking for a CUDA device without one
// fails here too, with the backend's "no CUDA device" error.
void check_device_memory(const MemoryEstimate& need, Device device, const std::string& what);

// "15.71B", "2.45M", ...
std::string human_count(double n);
std::string human_bytes(double n);

}  // namespace moekit
