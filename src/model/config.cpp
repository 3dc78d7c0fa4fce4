// config.json parsing, validation and writing for deepseek_v2 / deepseek_v3.
#include "model/config.h"

#include <cmath>
#include <fstream>
#include <set>
#include <sstream>

#include "core/error.h"

namespace moekit {

using json = nlohmann::json;

namespace {

double yarn_mscale(double s, double m) {
  return s <= 1.0 ? 1.0 : 0.1 * m * std::log(s) + 1.0;
}

// transformers 5's DeepseekV3Config defaults where they differ from V2's.
ModelConfig defaults_for(const std::string& model_type) {
  ModelConfig c;
  c.model_type = model_type;
  if (model_type == "deepseek_v3") {
    c.vocab_size = 129280;
    c.n_routed_experts = 256;
    c.n_shared_experts = 1;
    c.num_experts_per_tok = 8;
    c.moe_intermediate_size = 2048;
    c.first_k_dense_replace = 3;
    c.q_lora_rank = 1536;
    c.topk_method = "noaux_tc";
    c.scoring_func = "sigmoid";
    c.n_group = 8;
    c.topk_group = 4;
    c.norm_topk_prob = true;
    c.routed_scaling_factor = 2.5;
    c.bos_token_id = 0;
    c.eos_token_id = 1;
  }
  return c;
}

class Reader {
 public:
  Reader(const json& j, const std::string& src) : j_(j), src_(src) {}

  [[noreturn]] void bad(const std::string& field, const std::string& what) const {
    fail("{}: field \"{}\": {}", src_, field, what);
  }
  void integer(const char* f, int64_t& out, bool required = false, int64_t min = 1) const {
    if (!j_.contains(f) || j_[f].is_null()) {
      if (required) bad(f, "required field is missing");
      return;
    }
    if (!j_[f].is_number_integer()) bad(f, "expected an integer, got " + j_[f].dump());
    out = j_[f].get<int64_t>();
    if (out < min) bad(f, fmt::format("expected an integer >= {}, got {}", min, out));
  }
  void number(const char* f, double& out, double min = -1e300) const {
    if (!j_.contains(f) || j_[f].is_null()) return;
    if (!j_[f].is_number()) bad(f, "expected a number, got " + j_[f].dump());
    out = j_[f].get<double>();
    if (!(out >= min) || !std::isfinite(out))
      bad(f, fmt::format("expected a number >= {}, got {}", min, out));
  }
  void boolean(const char* f, bool& out) const {
    if (!j_.contains(f) || j_[f].is_null()) return;
    if (!j_[f].is_boolean()) bad(f, "expected true or false, got " + j_[f].dump());
    out = j_[f].get<bool>();
  }
  void string(const char* f, std::string& out) const {
    if (!j_.contains(f) || j_[f].is_null()) return;
    if (!j_[f].is_string()) bad(f, "expected a string, got " + j_[f].dump());
    out = j_[f].get<std::string>();
  }

 private:
  const json& j_;
  const std::string& src_;
};

void read_rope(const json& j, ModelConfig& c, const std::string& src) {
  // transformers 5 spelling wins when both are present (it is what transformers itself reads).
  const bool hf5 = j.contains("rope_parameters") && j["rope_parameters"].is_object();
  const char* field = hf5 ? "rope_parameters" : "rope_scaling";
  if (!hf5) Reader(j, src).number("rope_theta", c.rope_theta, 1.0);
  if (!j.contains(field) || j[field].is_null()) return;
  const json& r = j[field];
  if (!r.is_object()) fail("{}: field \"{}\": expected an object, got {}", src, field, r.dump());
  Reader rr(r, src);
  std::string type = "default";
  if (r.contains("rope_type"))
    rr.string("rope_type", type);
  else
    rr.string("type", type);
  if (hf5) rr.number("rope_theta", c.rope_theta, 1.0);
  if (type != "default" && type != "yarn")
    fail("{}: field \"{}\": rope type \"{}\" is not supported (moekit implements default and yarn)",
         src, field, type);
  c.rope_scaling.type = type;
  if (type == "yarn") {
    rr.number("factor", c.rope_scaling.factor, 1.0);
    rr.integer("original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings);
    rr.number("beta_fast", c.rope_scaling.beta_fast, 0.0);
    rr.number("beta_slow", c.rope_scaling.beta_slow, 0.0);
    rr.number("mscale", c.rope_scaling.mscale, 0.0);
    rr.number("mscale_all_dim", c.rope_scaling.mscale_all_dim, 0.0);
  }
}

}  // namespace

GateParams ModelConfig::gate_params() const {
  GateParams p;
  p.scoring = scoring_func == "sigmoid" ? ScoringFunc::Sigmoid : ScoringFunc::Softmax;
  p.method = topk_method == "noaux_tc"               ? TopkMethod::NoauxTc
             : topk_method == "group_limited_greedy" ? TopkMethod::GroupLimitedGreedy
                                                     : TopkMethod::Greedy;
  p.n_experts = n_routed_experts;
  p.top_k = num_experts_per_tok;
  p.n_group = n_group;
  p.topk_group = topk_group;
  p.norm_topk_prob = norm_topk_prob;
  p.routed_scaling_factor = float(routed_scaling_factor);
  return p;
}

double ModelConfig::softmax_scale() const {
  double s = 1.0 / std::sqrt(double(qk_head_dim()));
  if (rope_scaling.type == "yarn" && rope_scaling.mscale_all_dim > 0) {
    double m = yarn_mscale(rope_scaling.factor, rope_scaling.mscale_all_dim);
    s *= m * m;
  }
  return s;
}

double ModelConfig::rope_attention_factor() const {
  if (rope_scaling.type != "yarn") return 1.0;
  return yarn_mscale(rope_scaling.factor, rope_scaling.mscale) /
         yarn_mscale(rope_scaling.factor, rope_scaling.mscale_all_dim);
}

ModelConfig config_from_json(const json& j, const std::string& src) {
  if (!j.is_object()) fail("{}: expected a JSON object", src);
  if (!j.contains("model_type") || !j["model_type"].is_string())
    fail("{}: field \"model_type\": required field is missing", src);
  const std::string type = j["model_type"].get<std::string>();
  if (type == "deepseek")
    fail(
        "{}: field \"model_type\": \"deepseek\" (DeepSeekMoE) is not supported: its multi-head "
        "attention (q_proj/k_proj/v_proj) is not implemented; moekit reads deepseek_v2 and "
        "deepseek_v3 (MLA)",
        src);
  if (type != "deepseek_v2" && type != "deepseek_v3")
    fail(
        "{}: field \"model_type\": \"{}\" is not supported (moekit reads deepseek_v2 and "
        "deepseek_v3)",
        src, type);
  ModelConfig c = defaults_for(type);
  Reader r(j, src);
  r.integer("vocab_size", c.vocab_size, true);
  r.integer("hidden_size", c.hidden_size, true);
  r.integer("intermediate_size", c.intermediate_size);
  r.integer("num_hidden_layers", c.num_hidden_layers, true);
  r.integer("num_attention_heads", c.num_attention_heads, true);
  c.num_key_value_heads = c.num_attention_heads;
  r.integer("num_key_value_heads", c.num_key_value_heads);
  r.integer("max_position_embeddings", c.max_position_embeddings);
  r.number("rms_norm_eps", c.rms_norm_eps, 0.0);
  r.number("initializer_range", c.initializer_range, 0.0);
  r.string("hidden_act", c.hidden_act);
  r.boolean("tie_word_embeddings", c.tie_word_embeddings);
  r.boolean("attention_bias", c.attention_bias);
  r.integer("bos_token_id", c.bos_token_id, false, 0);
  r.integer("eos_token_id", c.eos_token_id, false, 0);
  if (j.contains("dtype"))
    r.string("dtype", c.torch_dtype);
  else
    r.string("torch_dtype", c.torch_dtype);
  if (j.contains("q_lora_rank") && j["q_lora_rank"].is_null())
    c.q_lora_rank = 0;
  else
    r.integer("q_lora_rank", c.q_lora_rank, false, 0);
  r.integer("kv_lora_rank", c.kv_lora_rank);
  r.integer("qk_nope_head_dim", c.qk_nope_head_dim);
  r.integer("qk_rope_head_dim", c.qk_rope_head_dim, false, 2);
  r.integer("v_head_dim", c.v_head_dim);
  r.integer("n_routed_experts", c.n_routed_experts, false, 0);
  r.integer("n_shared_experts", c.n_shared_experts, false, 0);
  r.integer("num_experts_per_tok", c.num_experts_per_tok);
  r.integer("moe_intermediate_size", c.moe_intermediate_size);
  r.integer("first_k_dense_replace", c.first_k_dense_replace, false, 0);
  r.integer("moe_layer_freq", c.moe_layer_freq);
  r.string("topk_method", c.topk_method);
  r.string("scoring_func", c.scoring_func);
  r.integer("n_group", c.n_group);
  r.integer("topk_group", c.topk_group);
  r.boolean("norm_topk_prob", c.norm_topk_prob);
  r.number("routed_scaling_factor", c.routed_scaling_factor, 0.0);
  r.number("aux_loss_alpha", c.aux_loss_alpha, 0.0);
  r.boolean("seq_aux", c.seq_aux);
  read_rope(j, c, src);
  // Fields that would change the math in ways moekit does not implement.
  for (const char* f : {"mlp_bias", "use_qk_norm"})
    if (j.contains(f) && j[f].is_boolean() && j[f].get<bool>())
      fail("{}: field \"{}\": true is not supported", src, f);
  if (j.contains("qk_head_dim") && j["qk_head_dim"].is_number_integer() &&
      j["qk_head_dim"].get<int64_t>() != c.qk_head_dim())
    fail("{}: field \"qk_head_dim\": {} != qk_nope_head_dim + qk_rope_head_dim ({})", src,
         j["qk_head_dim"].get<int64_t>(), c.qk_head_dim());
  validate(c, src);
  return c;
}

void validate(const ModelConfig& c, const std::string& src) {
  auto bad = [&](const char* field, const std::string& what) {
    fail("{}: field \"{}\": {}", src, field, what);
  };
  if (c.model_type != "deepseek_v2" && c.model_type != "deepseek_v3")
    bad("model_type", "\"" + c.model_type + "\" is not supported");
  for (auto [name, v] : {std::pair{"vocab_size", c.vocab_size},
                         {"hidden_size", c.hidden_size},
                         {"num_hidden_layers", c.num_hidden_layers},
                         {"num_attention_heads", c.num_attention_heads},
                         {"kv_lora_rank", c.kv_lora_rank},
                         {"qk_nope_head_dim", c.qk_nope_head_dim},
                         {"v_head_dim", c.v_head_dim},
                         {"intermediate_size", c.intermediate_size}})
    if (v < 1) bad(name, fmt::format("expected a positive integer, got {}", v));
  if (c.qk_rope_head_dim < 2 || c.qk_rope_head_dim % 2)
    bad("qk_rope_head_dim", "must be even and >= 2");
  if (c.hidden_act != "silu")
    bad("hidden_act", "\"" + c.hidden_act + "\" is not supported (silu only)");
  if (c.tie_word_embeddings)
    bad("tie_word_embeddings", "true is not supported (DeepSeek unties lm_head)");
  if (c.attention_bias) bad("attention_bias", "true is not supported");
  if (c.num_key_value_heads != c.num_attention_heads)
    bad("num_key_value_heads", "must equal num_attention_heads for MLA");
  if (c.n_routed_experts > 0) {
    if (c.moe_intermediate_size < 1) bad("moe_intermediate_size", "expected a positive integer");
    if (c.num_experts_per_tok < 1 || c.num_experts_per_tok > c.n_routed_experts)
      bad("num_experts_per_tok", fmt::format("must be in [1, n_routed_experts = {}], got {}",
                                             c.n_routed_experts, c.num_experts_per_tok));
    static const std::set<std::string> methods = {"greedy", "group_limited_greedy", "noaux_tc"};
    if (!methods.count(c.topk_method))
      bad("topk_method", "\"" + c.topk_method + "\" is not supported");
    if (c.scoring_func != "softmax" && c.scoring_func != "sigmoid")
      bad("scoring_func", "\"" + c.scoring_func + "\" is not supported (softmax, sigmoid)");
    if (c.n_group < 1 || c.n_routed_experts % c.n_group)
      bad("n_group",
          fmt::format("must divide n_routed_experts ({}), got {}", c.n_routed_experts, c.n_group));
    if (c.topk_group < 1 || c.topk_group > c.n_group)
      bad("topk_group",
          fmt::format("must be in [1, n_group = {}], got {}", c.n_group, c.topk_group));
    if (c.topk_method != "greedy" &&
        c.topk_group * (c.n_routed_experts / c.n_group) < c.num_experts_per_tok)
      bad("topk_group", "the kept groups hold fewer experts than num_experts_per_tok");
  }
  if (c.moe_layer_freq < 1) bad("moe_layer_freq", "expected a positive integer");
  if (c.rope_scaling.type == "yarn" && c.rope_scaling.factor < 1.0)
    bad("rope_scaling", "yarn factor must be >= 1");
}

ModelConfig load_config(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) fail("{}: cannot read file", file.string());
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, false);
  if (j.is_discarded()) fail("{}: not valid JSON", file.string());
  return config_from_json(j, file.string());
}

json config_to_json(const ModelConfig& c) {
  json j;
  j["architectures"] = {c.model_type == "deepseek_v3" ? "DeepseekV3ForCausalLM"
                                                      : "DeepseekV2ForCausalLM"};
  j["model_type"] = c.model_type;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["initializer_range"] = c.initializer_range;
  j["hidden_act"] = c.hidden_act;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["attention_bias"] = c.attention_bias;
  j["bos_token_id"] = c.bos_token_id;
  j["eos_token_id"] = c.eos_token_id;
  j["torch_dtype"] = c.torch_dtype;
  j["q_lora_rank"] = c.q_lora_rank > 0 ? json(c.q_lora_rank) : json(nullptr);
  j["kv_lora_rank"] = c.kv_lora_rank;
  j["qk_nope_head_dim"] = c.qk_nope_head_dim;
  j["qk_rope_head_dim"] = c.qk_rope_head_dim;
  j["v_head_dim"] = c.v_head_dim;
  j["n_routed_experts"] = c.n_routed_experts;
  j["n_shared_experts"] = c.n_shared_experts;
  j["num_experts_per_tok"] = c.num_experts_per_tok;
  j["moe_intermediate_size"] = c.moe_intermediate_size;
  j["first_k_dense_replace"] = c.first_k_dense_replace;
  j["moe_layer_freq"] = c.moe_layer_freq;
  j["topk_method"] = c.topk_method;
  j["scoring_func"] = c.scoring_func;
  j["n_group"] = c.n_group;
  j["topk_group"] = c.topk_group;
  j["norm_topk_prob"] = c.norm_topk_prob;
  j["routed_scaling_factor"] = c.routed_scaling_factor;
  j["aux_loss_alpha"] = c.aux_loss_alpha;
  j["seq_aux"] = c.seq_aux;
  j["rope_theta"] = c.rope_theta;
  json rp = {{"rope_type", c.rope_scaling.type}, {"rope_theta", c.rope_theta}};
  if (c.rope_scaling.type == "yarn") {
    json y = {{"factor", c.rope_scaling.factor},
              {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings},
              {"beta_fast", c.rope_scaling.beta_fast},
              {"beta_slow", c.rope_scaling.beta_slow},
              {"mscale", c.rope_scaling.mscale},
              {"mscale_all_dim", c.rope_scaling.mscale_all_dim}};
    j["rope_scaling"] = y;
    j["rope_scaling"]["type"] = "yarn";
    rp.update(y);
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["rope_parameters"] = rp;
  return j;
}

}  // namespace moekit
