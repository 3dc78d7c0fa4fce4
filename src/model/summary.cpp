// Parameter arithmetic of the DeepSeek blocks.
#include "model/summary.h"
#include <algorithm>

#include <fmt/format.h>

#include "core/error.h"
#include "ops/ops.h"

namespace moekit {

ModelSummary summarize(const ModelConfig& c) {
  ModelSummary s;
  const int64_t H = c.hidden_size, nh = c.num_attention_heads;
  s.embedding = c.vocab_size * H;
  s.lm_head = c.vocab_size * H;
  s.final_norm = H;
  int64_t attn = 0;
  if (c.q_lora_rank > 0)
    attn += H * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * nh * c.qk_head_dim();
  else
    attn += H * nh * c.qk_head_dim();
  attn += H * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank;
  attn += c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim);
  attn += nh * c.v_head_dim * H;
  s.total = s.embedding + s.lm_head + s.final_norm;
  s.active = s.total;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerSummary ls;
    ls.index = l;
    ls.attention = attn;
    ls.norms = 2 * H;
    if (c.is_moe_layer(l)) {
      ls.ffn = "moe";
      const int64_t expert = 3 * H * c.moe_intermediate_size;
      const int64_t shared = 3 * H * c.moe_intermediate_size * c.n_shared_experts;
      const int64_t gate = c.n_routed_experts * H;
      ls.ffn_params = gate + c.n_routed_experts * expert + shared;
      ls.ffn_active = gate + c.num_experts_per_tok * expert + shared;
    } else {
      ls.ffn = "dense";
      ls.ffn_params = ls.ffn_active = 3 * H * c.intermediate_size;
    }
    s.total += ls.attention + ls.norms + ls.ffn_params;
    s.active += ls.attention + ls.norms + ls.ffn_active;
    s.layers.push_back(ls);
  }
  s.kv_cache_per_token = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim);
  return s;
}

std::string human_count(double n) {
  if (n >= 1e9) return fmt::format("{:.2f}B", n / 1e9);
  if (n >= 1e6) return fmt::format("{:.2f}M", n / 1e6);
  if (n >= 1e3) return fmt::format("{:.2f}K", n / 1e3);
  return fmt::format("{:.0f}", n);
}

std::string human_bytes(double n) {
  if (n >= 1024.0 * 1024 * 1024) return fmt::format("{:.2f} GiB", n / (1024.0 * 1024 * 1024));
  if (n >= 1024.0 * 1024) return fmt::format("{:.2f} MiB", n / (1024.0 * 1024));
  if (n >= 1024.0) return fmt::format("{:.1f} KiB", n / 1024.0);
  return fmt::format("{:.0f} B", n);
}

MemoryEstimate estimate_memory(const ModelConfig& c, int64_t tokens, int64_t trainable_params,
                               DType weights, bool checkpointing, bool recompute_experts) {
  MemoryEstimate m;
  const double total = double(summarize(c).total);
  m.weights = total * 4.0;
  if (weights == DType::BF16) {  // the frozen rest in bf16, embedding and LM head included
    const double frozen = std::max(0.0, total - double(trainable_params));
    // A trainable matrix: its fp32 master and its bf16 GEMM copy (Param::gemm_copy).
    m.weights = (total - frozen) * 6.0 + frozen * 2.0;
  }
  m.grads = double(trainable_params) * 4.0;
  m.optimizer = double(trainable_params) * 8.0;
  // Per token and layer about 40 hidden-sized fp32 vectors (norms, MLA projections, attention,
  // residuals, gradients in flight), the routed experts' rows (gate, up, h of K experts) and
  // three vocabulary-sized rows (logits, their gradient, the loss pass).
  const double experts = 3.0 * double(c.num_experts_per_tok) * double(c.moe_intermediate_size);
  const double per_layer = 40.0 * double(c.hidden_size) + experts;
  const double layers = double(c.num_hidden_layers);
  double kept = checkpointing ? per_layer + layers * double(c.hidden_size) : per_layer * layers;
  if (recompute_experts && !checkpointing) kept -= (layers - 1.0) * experts;
  const double logit_rows =
      trainable_params > 0 ? double(std::min<int64_t>(tokens, 1024)) : double(tokens);
  m.activations = (double(tokens) * kept + logit_rows * 3.0 * double(c.vocab_size)) * 4.0;
  return m;
}

void check_device_memory(const MemoryEstimate& need, Device device, const std::string& what) {
  size_t free_bytes = 0, total_bytes = 0;
  backend(device).memory_info(free_bytes, total_bytes);
  const bool gpu = device != Device::CPU;
  // The host check compares with physical memory (swap and page cache make "free" too strict).
  const double have = double(gpu ? free_bytes : total_bytes);
  if (need.total() <= have) return;
  fail(
      "{}: needs about {} of {} memory (weights {}, gradients {}, AdamW state {}, activations "
      "{}), {} {}",
      what, human_bytes(need.total()), gpu ? "GPU" : "host", human_bytes(need.weights),
      human_bytes(need.grads), human_bytes(need.optimizer), human_bytes(need.activations),
      gpu ? "the GPU has" : "this machine has",
      gpu ? fmt::format("{} free of {}", human_bytes(double(free_bytes)),
                        human_bytes(double(total_bytes)))
          : human_bytes(double(total_bytes)));
}

}  // namespace moekit
