// config.json: both rope spellings, V2/V3 defaults, YaRN numbers, validation errors naming the
// file and field, and the published configs' parameter counts.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/config.h"
#include "model/summary.h"

namespace moekit {
namespace {

using json = nlohmann::json;

json base() {
  return json::parse(R"({"model_type": "deepseek_v2", "vocab_size": 100, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "q_lora_rank": null, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
    "v_head_dim": 8, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
    "moe_intermediate_size": 16, "first_k_dense_replace": 1})");
}

std::string error_of(const json& j) {
  try {
    config_from_json(j, "m/config.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(Config, BothRopeSpellingsAndYarnNumbers) {
  json deepseek = base();
  deepseek["rope_theta"] = 5000.0;
  deepseek["rope_scaling"] = {
      {"type", "yarn"},         {"factor", 40},   {"original_max_position_embeddings", 4096},
      {"beta_fast", 32},        {"beta_slow", 1}, {"mscale", 0.707},
      {"mscale_all_dim", 0.707}};
  json hf5 = base();
  hf5["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 5000.0},
                            {"factor", 40},        {"original_max_position_embeddings", 4096},
                            {"beta_fast", 32},     {"beta_slow", 1},
                            {"mscale", 0.707},     {"mscale_all_dim", 0.707}};
  for (const json& j : {deepseek, hf5}) {
    ModelConfig c = config_from_json(j, "x");
    EXPECT_EQ(c.rope_theta, 5000.0);
    EXPECT_EQ(c.rope_scaling.type, "yarn");
    EXPECT_EQ(c.rope_scaling.factor, 40.0);
    EXPECT_EQ(c.q_lora_rank, 0);
    // mscale(40, 0.707) = 0.0707 ln 40 + 1; the ratio is 1 when both mscales are equal.
    const double m = 0.1 * 0.707 * std::log(40.0) + 1.0;
    EXPECT_NEAR(c.softmax_scale(), m * m / 4.0, 1e-12);  // qk_head_dim 16 -> 1/4
    EXPECT_NEAR(c.rope_attention_factor(), 1.0, 1e-12);
  }
  // Round trip through config_to_json keeps every field.
  ModelConfig c = config_from_json(hf5, "x");
  ModelConfig again = config_from_json(config_to_json(c), "y");
  EXPECT_EQ(config_to_json(again), config_to_json(c));
}

TEST(Config, V3DefaultsDifferFromV2) {
  json j = base();
  j["model_type"] = "deepseek_v3";
  for (const char* k : {"n_routed_experts", "num_experts_per_tok", "n_shared_experts"}) j.erase(k);
  j["n_routed_experts"] = 16;
  j["num_experts_per_tok"] = 4;
  j["n_group"] = 4;
  j["topk_group"] = 2;
  ModelConfig c = config_from_json(j, "x");
  EXPECT_EQ(c.topk_method, "noaux_tc");
  EXPECT_EQ(c.scoring_func, "sigmoid");
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.routed_scaling_factor, 2.5);
  EXPECT_EQ(config_from_json(base(), "x").topk_method, "greedy");
}

TEST(Config, ValidationErrorsNameFileAndField) {
  struct Case {
    std::function<void(json&)> edit;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {[](json& j) { j["model_type"] = "llama"; },
       "field \"model_type\": \"llama\" is not supported"},
      {[](json& j) { j.erase("hidden_size"); }, "field \"hidden_size\": required field is missing"},
      {[](json& j) { j["hidden_size"] = "big"; }, "field \"hidden_size\": expected an integer"},
      {[](json& j) { j["num_hidden_layers"] = 0; },
       "field \"num_hidden_layers\": expected an integer >= 1"},
      {[](json& j) { j["qk_rope_head_dim"] = 7; }, "field \"qk_rope_head_dim\": must be even"},
      {[](json& j) { j["n_group"] = 3; }, "field \"n_group\": must divide n_routed_experts"},
      {[](json& j) {
         j["n_group"] = 2;
         j["topk_group"] = 3;
       },
       "field \"topk_group\""},
      {[](json& j) { j["num_experts_per_tok"] = 9; }, "field \"num_experts_per_tok\""},
      {[](json& j) { j["topk_method"] = "random"; }, "field \"topk_method\""},
      {[](json& j) { j["scoring_func"] = "relu"; }, "field \"scoring_func\""},
      {[](json& j) { j["hidden_act"] = "gelu"; }, "field \"hidden_act\""},
      {[](json& j) {
         j["rope_scaling"] = {{"type", "linear"}, {"factor", 2}};
       },
       "rope type \"linear\" is not supported"},
      {[](json& j) { j["num_key_value_heads"] = 1; }, "field \"num_key_value_heads\""},
      {[](json& j) { j["mlp_bias"] = true; }, "field \"mlp_bias\""},
      {[](json& j) { j["tie_word_embeddings"] = true; }, "field \"tie_word_embeddings\""},
      {[](json& j) { j["qk_head_dim"] = 99; }, "field \"qk_head_dim\""},
  };
  for (const auto& c : cases) {
    json j = base();
    c.edit(j);
    std::string e = error_of(j);
    EXPECT_NE(e.find("m/config.json"), std::string::npos) << e;
    EXPECT_NE(e.find(c.expect), std::string::npos) << e;
  }
  EXPECT_NE(error_of(json::array()).find("expected a JSON object"), std::string::npos);
}

// Published configurations: parameter counts from the config alone.
TEST(Config, PublishedSizes) {
  struct Case {
    const char* file;
    double total, active;  // billions, as published
  };
  for (const Case& c : {Case{"deepseek-v2-lite.json", 15.7, 2.4}, Case{"deepseek-v2.json", 236, 21},
                        Case{"deepseek-v3.json", 671, 37}}) {
    ModelConfig cfg = load_config(std::string(MOEKIT_SOURCE_DIR) + "/configs/" + c.file);
    ModelSummary s = summarize(cfg);
    // Published totals exclude V3's multi-token-prediction module (moekit builds none); published
    // activated counts exclude the input embedding table (a lookup, not compute).
    const double total = double(s.total) / 1e9, active = double(s.active - s.embedding) / 1e9;
    EXPECT_NEAR(total / c.total, 1.0, 0.02) << c.file << " total " << total;
    EXPECT_NEAR(active / c.active, 1.0, 0.03) << c.file << " active " << active;
  }
}

}  // namespace
}  // namespace moekit
