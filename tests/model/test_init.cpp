// model/init.h: the counter-based normal stream (chunking-independent, N(0, std)), the checkpoint
// layout against checkpoints transformers wrote, and the shard plan.
#include "model/init.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "model/safetensors.h"
#include "model/summary.h"

namespace moekit {
namespace {

namespace fs = std::filesystem;

const fs::path kFix = fs::path(MOEKIT_SOURCE_DIR) / "tests/fixtures/parity";

TEST(InitStream, ChunkingAndOffsetsGiveTheSameValues) {
  const uint64_t key = init_key("model.layers.0.mlp.gate_proj.weight", 7);
  std::vector<float> whole(1001), parts(1001);
  normal_fill(whole.data(), key, 0, 1001, 0.02f);
  // Odd and even cuts: each value depends on its index only.
  const int64_t cuts[] = {0, 1, 4, 7, 500, 999, 1001};
  for (size_t i = 0; i + 1 < std::size(cuts); ++i)
    normal_fill(parts.data() + cuts[i], key, cuts[i], cuts[i + 1] - cuts[i], 0.02f);
  EXPECT_EQ(std::memcmp(whole.data(), parts.data(), whole.size() * sizeof(float)), 0);
}

TEST(InitStream, KeysDependOnNameAndSeed) {
  const uint64_t a = init_key("lm_head.weight", 0);
  EXPECT_EQ(a, init_key("lm_head.weight", 0));
  EXPECT_NE(a, init_key("lm_head.weight", 1));
  EXPECT_NE(a, init_key("model.embed_tokens.weight", 0));
}

TEST(InitStream, IsNormalWithTheRequestedStd) {
  const int64_t n = 1 << 20;
  std::vector<float> v(static_cast<size_t>(n));
  normal_fill(v.data(), init_key("w", 3), 0, n, 0.02f);
  double sum = 0, sq = 0, quart = 0;
  int64_t within = 0;
  for (float x : v) {
    sum += x;
    sq += double(x) * x;
    within += std::abs(x) < 0.02f;
  }
  const double mean = sum / double(n), var = sq / double(n) - mean * mean;
  for (float x : v) quart += std::pow((x - mean) / std::sqrt(var), 4);
  EXPECT_NEAR(mean, 0.0, 1e-4);
  EXPECT_NEAR(std::sqrt(var), 0.02, 0.02 * 0.005);
  EXPECT_NEAR(double(within) / double(n), 0.6827, 0.003);  // P(|z| < 1)
  EXPECT_NEAR(quart / double(n), 3.0, 0.03);               // normal kurtosis
}

// Names and shapes of checkpoint_layout equal those of the checkpoints transformers 5 saved.
TEST(InitLayout, MatchesTransformersCheckpoints) {
  for (const char* fixture : {"v2_lite", "v2_group", "v3_yarn", "dense2_bf16"}) {
    const ModelConfig c = load_config(kFix / fixture / "config.json");
    std::map<std::string, Shape> want;
    for (const auto& [name, e] : load_checkpoint_tensors(kFix / fixture))
      want[name] = e.tensor.shape();
    std::map<std::string, Shape> got;
    for (const auto& t : checkpoint_layout(c)) got[t.name] = t.shape;
    EXPECT_EQ(got.size(), want.size()) << fixture;
    for (const auto& [name, shape] : want) {
      ASSERT_TRUE(got.count(name)) << fixture << ": layout lacks " << name;
      EXPECT_EQ(got[name], shape) << fixture << ": " << name;
    }
  }
}

TEST(InitLayout, InitKinds) {
  const ModelConfig c = load_config(kFix / "v3_yarn/config.json");
  std::set<std::string> ones, zeros;
  for (const auto& t : checkpoint_layout(c)) {
    if (t.init == TensorInit::Ones) ones.insert(t.name);
    if (t.init == TensorInit::Zeros) zeros.insert(t.name);
  }
  EXPECT_TRUE(ones.count("model.norm.weight"));
  EXPECT_TRUE(ones.count("model.layers.0.input_layernorm.weight"));
  EXPECT_TRUE(ones.count("model.layers.1.self_attn.kv_a_layernorm.weight"));
  for (const auto& n : ones) EXPECT_TRUE(n.ends_with("norm.weight")) << n;
  ASSERT_FALSE(zeros.empty());
  for (const auto& n : zeros) EXPECT_TRUE(n.ends_with("e_score_correction_bias")) << n;
}

TEST(InitPlan, ParamsEqualTheSummaryForPublishedConfigs) {
  for (const char* f : {"deepseek-v2-lite.json", "deepseek-coder-v2-lite.json", "deepseek-v2.json",
                        "deepseek-v3.json", "moekit-demo.json"}) {
    const ModelConfig c = load_config(fs::path(MOEKIT_SOURCE_DIR) / "configs" / f);
    const InitPlan p = plan_init(c, InitOptions{});
    EXPECT_EQ(p.params, summarize(c).total) << f;
  }
}

TEST(InitPlan, ShardsLikeTransformers) {
  const ModelConfig c = load_config(kFix / "v2_lite/config.json");
  InitOptions o;
  const InitPlan one = plan_init(c, o);
  ASSERT_EQ(one.shards.size(), 1u);
  EXPECT_EQ(one.shards[0].file, "model.safetensors");
  EXPECT_TRUE(one.index_json.empty());

  o.shard_bytes = 4000;
  const InitPlan p = plan_init(c, o);
  ASSERT_GT(p.shards.size(), 2u);
  const size_t n = p.shards.size();
  EXPECT_EQ(p.shards[0].file, fmt::format("model-00001-of-{:05}.safetensors", n));
  size_t tensors = 0;
  for (const auto& s : p.shards) {
    uint64_t data = 0;
    for (size_t t : s.tensors) data += uint64_t(p.tensors[t].shape.numel()) * 2;
    EXPECT_TRUE(data <= o.shard_bytes || s.tensors.size() == 1) << s.file;
    tensors += s.tensors.size();
  }
  EXPECT_EQ(tensors, p.tensors.size());
  auto index = nlohmann::json::parse(p.index_json);
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), p.data_bytes);
  EXPECT_EQ(index["weight_map"].size(), p.tensors.size());
  EXPECT_EQ(index["weight_map"]["lm_head.weight"], p.shards.back().file);
}

}  // namespace
}  // namespace moekit
