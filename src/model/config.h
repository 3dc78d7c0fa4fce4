// ModelConfig: the Hugging Face config.json of a DeepSeek model, field names as transformers and
// DeepSeek write them. Every field has a default (DeepSeek-V2-Lite's where one exists) and the
// variant of each block is chosen by a field, never guessed from a size (style.md).
// Reads both rope spellings: DeepSeek's `rope_theta` + `rope_scaling` and transformers 5's
// `rope_parameters`.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "ops/ops.h"

namespace moekit {

struct RopeScaling {
  std::string type = "default";  // "default" or "yarn"
  double factor = 1.0;
  int64_t original_max_position_embeddings = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;  // 0 = absent
};

struct ModelConfig {
  std::string model_type = "deepseek_v2";  // deepseek_v2 | deepseek_v3
  int64_t vocab_size = 102400;
  int64_t hidden_size = 2048;
  int64_t intermediate_size = 10944;  // dense FFN width
  int64_t num_hidden_layers = 27;
  int64_t num_attention_heads = 16;
  int64_t num_key_value_heads = 16;
  int64_t max_position_embeddings = 163840;
  double rms_norm_eps = 1e-6;
  std::string hidden_act = "silu";
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  int64_t bos_token_id = 100000;
  int64_t eos_token_id = 100001;
  std::string torch_dtype = "bfloat16";
  double initializer_range = 0.02;  // std of the normal init (moekit init, transformers)

  // mla: Multi-head Latent Attention
  int64_t q_lora_rank = 0;  // 0 = no q compression (config null)
  int64_t kv_lora_rank = 512;
  int64_t qk_nope_head_dim = 128;
  int64_t qk_rope_head_dim = 64;
  int64_t v_head_dim = 128;

  // rope / yarn
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;

  // moe: DeepSeekMoE layers
  int64_t n_routed_experts = 64;
  int64_t n_shared_experts = 2;
  int64_t num_experts_per_tok = 6;
  int64_t moe_intermediate_size = 1408;
  int64_t first_k_dense_replace = 1;
  int64_t moe_layer_freq = 1;
  std::string topk_method = "greedy";    // greedy | group_limited_greedy | noaux_tc
  std::string scoring_func = "softmax";  // softmax | sigmoid
  int64_t n_group = 1;
  int64_t topk_group = 1;
  bool norm_topk_prob = false;
  double routed_scaling_factor = 1.0;
  double aux_loss_alpha = 0.001;
  bool seq_aux = true;

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  bool is_moe_layer(int64_t layer) const {
    return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  GateParams gate_params() const;
  // softmax scale of MLA: qk_head_dim^-0.5, times yarn mscale(factor, mscale_all_dim)^2.
  double softmax_scale() const;
  // The factor cos/sin are multiplied by (1 without YaRN).
  double rope_attention_factor() const;
};

// Parses and validates; errors name `source` and the field.
ModelConfig config_from_json(const nlohmann::json& j, const std::string& source);
ModelConfig load_config(const std::filesystem::path& file);
// Writes DeepSeek's spelling plus transformers 5's `rope_parameters`, so both readers load it.
nlohmann::json config_to_json(const ModelConfig& c);
void validate(const ModelConfig& c, const std::string& source);

}  // namespace moekit
