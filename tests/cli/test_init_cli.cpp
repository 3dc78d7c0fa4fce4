// `moekit init` contracts: the checkpoint loads (info, forward), values are deterministic in the
// seed, dtype and init rules are honoured, sharding, the dry-run counts of every published config,
// and bad input (one line, exit 2, nothing written).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <regex>

#include "../temp_dir.h"
#include "model/safetensors.h"
#include "model/summary.h"
#include "run_cli.h"

namespace moekit {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using test::run_moekit;

const fs::path kFix = fs::path(MOEKIT_SOURCE_DIR) / "tests/fixtures/parity";

// A fixture's config with `edit` applied, written into `dir`.
fs::path config_from(const test::TempDir& dir, const std::string& fixture,
                     const std::function<void(json&)>& edit = {}) {
  json j = json::parse(test::read_text(kFix / fixture / "config.json"));
  if (edit) edit(j);
  static int count = 0;  // one file per call: the same fixture may be edited differently
  const fs::path p = dir / (fixture + "-" + std::to_string(++count) + ".json");
  test::write_text(p, j.dump(2));
  return p;
}

test::CliResult init(const fs::path& config, const fs::path& out, const std::string& extra = "") {
  return run_moekit("init --config " + config.string() + " --out " + out.string() + " " + extra);
}

std::map<std::string, Tensor> tensors_of(const fs::path& dir) {
  std::map<std::string, Tensor> out;
  for (const auto& [name, e] : load_checkpoint_tensors(dir)) out[name] = e.tensor.clone();
  return out;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

TEST(InitCli, WritesACheckpointThatInfoAndForwardLoad) {
  test::TempDir dir;
  for (const char* fixture : {"v2_lite", "v3_yarn"}) {
    const fs::path out = dir / (std::string(fixture) + "-init");
    auto r = init(config_from(dir, fixture), out);
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_TRUE(fs::exists(out / "model.safetensors"));
    EXPECT_FALSE(fs::exists(out / "model.safetensors.index.json"));
    auto info = run_moekit("info --model " + out.string());
    ASSERT_EQ(info.rc, 0) << info.err;
    EXPECT_NE(info.out.find("BF16"), std::string::npos) << info.out;
    auto fwd = run_moekit("forward --model " + out.string() + " --input " +
                          (kFix / fixture / "ids.json").string() + " --out " +
                          (dir / "logits.safetensors").string());
    ASSERT_EQ(fwd.rc, 0) << fwd.err;
    EXPECT_NE(fwd.out.find("\"loss\""), std::string::npos);
  }
}

TEST(InitCli, FollowsTransformersInitRules) {
  test::TempDir dir;
  // A larger vocabulary so the embedding has 256k values to measure.
  auto cfg = config_from(dir, "v3_yarn", [](json& j) {
    j["vocab_size"] = 8192;
    j["initializer_range"] = 0.03;
  });
  auto r = init(cfg, dir / "m");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(json::parse(test::read_text(dir / "m/config.json"))["torch_dtype"], "bfloat16");
  auto t = tensors_of(dir / "m");
  for (const auto& [name, tensor] : t) {
    EXPECT_EQ(tensor.dtype(), DType::BF16) << name;
    const Tensor f = tensor.to_f32();
    if (name.ends_with("norm.weight") || name.ends_with("e_score_correction_bias")) {
      const float want = name.ends_with("norm.weight") ? 1.0f : 0.0f;
      for (int64_t i = 0; i < f.numel(); ++i) ASSERT_EQ(f.f32()[i], want) << name;
    }
  }
  EXPECT_TRUE(t.count("model.layers.1.mlp.gate.e_score_correction_bias"));
  const Tensor e = t.at("model.embed_tokens.weight").to_f32();
  double sum = 0, sq = 0;
  for (int64_t i = 0; i < e.numel(); ++i) {
    sum += e.f32()[i];
    sq += double(e.f32()[i]) * e.f32()[i];
  }
  const double n = double(e.numel()), mean = sum / n;
  EXPECT_NEAR(mean, 0.0, 3e-4);
  EXPECT_NEAR(std::sqrt(sq / n - mean * mean), 0.03, 0.03 * 0.01);
}

TEST(InitCli, SameSeedSameBytesOtherSeedOtherValues) {
  test::TempDir dir;
  auto cfg = config_from(dir, "v2_lite");
  ASSERT_EQ(init(cfg, dir / "a", "--seed 5 --threads 1").rc, 0);  // threads change nothing
  ASSERT_EQ(init(cfg, dir / "b", "--seed 5").rc, 0);
  ASSERT_EQ(init(cfg, dir / "c", "--seed 6").rc, 0);
  EXPECT_EQ(test::read_text(dir / "a/model.safetensors"),
            test::read_text(dir / "b/model.safetensors"));
  auto a = tensors_of(dir / "a"), c = tensors_of(dir / "c");
  EXPECT_FALSE(same_bytes(a.at("lm_head.weight"), c.at("lm_head.weight")));
  EXPECT_TRUE(same_bytes(a.at("model.norm.weight"), c.at("model.norm.weight")));
}

TEST(InitCli, F32AndShardsHoldTheSameValues) {
  test::TempDir dir;
  auto cfg = config_from(dir, "v2_lite");
  ASSERT_EQ(init(cfg, dir / "one", "--dtype f32").rc, 0);
  auto r = init(cfg, dir / "sharded", "--dtype f32 --shard-size 20000");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(json::parse(test::read_text(dir / "one/config.json"))["torch_dtype"], "float32");
  auto index = json::parse(test::read_text(dir / "sharded/model.safetensors.index.json"));
  std::set<std::string> files;
  for (const auto& [name, file] : index["weight_map"].items()) files.insert(file);
  ASSERT_GT(files.size(), 2u);
  const std::regex shard_re(R"(model-\d{5}-of-(\d{5})\.safetensors)");
  for (const auto& f : files) {
    std::smatch m;
    ASSERT_TRUE(std::regex_match(f, m, shard_re)) << f;
    EXPECT_EQ(std::stoul(m[1]), files.size());
    EXPECT_TRUE(fs::exists(dir / "sharded" / f));
  }
  EXPECT_FALSE(fs::exists(dir / "sharded/model.safetensors"));
  auto one = tensors_of(dir / "one"), sharded = tensors_of(dir / "sharded");
  ASSERT_EQ(one.size(), sharded.size());
  for (const auto& [name, t] : one) {
    EXPECT_EQ(t.dtype(), DType::F32) << name;
    EXPECT_TRUE(same_bytes(t, sharded.at(name))) << name;
  }
  auto fwd = run_moekit("forward --model " + (dir / "sharded").string() + " --input " +
                        (kFix / "v2_lite/ids.json").string() + " --out " +
                        (dir / "l.safetensors").string());
  EXPECT_EQ(fwd.rc, 0) << fwd.err;
}

TEST(InitCli, CopiesTheTokenizer) {
  test::TempDir dir;
  test::write_text(dir / "text.txt", "the quick brown fox jumps over the lazy dog\n");
  ASSERT_EQ(run_moekit("tokenizer train --input " + (dir / "text.txt").string() +
                       " --vocab-size 300 --out " + (dir / "tok.json").string())
                .rc,
            0);
  auto big = config_from(dir, "v2_lite", [](json& j) { j["vocab_size"] = 512; });
  ASSERT_EQ(init(big, dir / "m", "--tokenizer " + (dir / "tok.json").string()).rc, 0);
  EXPECT_EQ(test::read_text(dir / "m/tokenizer.json"), test::read_text(dir / "tok.json"));
  // 96 ids cannot hold a 300-token vocabulary.
  auto r = init(config_from(dir, "v2_lite"), dir / "small",
                "--tokenizer " + (dir / "tok.json").string());
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("vocab_size"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir / "small"));
}

TEST(InitCli, BadInputWritesNothing) {
  test::TempDir dir;
  test::write_text(dir / "broken.json", "{\"model_type\": \"deepseek_v2\",");
  auto noheads = config_from(dir, "v2_lite", [](json& j) { j.erase("num_attention_heads"); });
  auto good = config_from(dir, "v2_lite");
  // A checkpoint no disk holds: 1e9 x 1e6 embedding.
  auto huge = config_from(dir, "v3_yarn", [](json& j) {
    j["vocab_size"] = 1000000000;
    j["hidden_size"] = 1000000;
  });
  struct Case {
    std::string name, args, expect;
  };
  const std::vector<Case> cases = {
      {"missing", "--config " + (dir / "absent.json").string(), "absent.json"},
      {"malformed", "--config " + (dir / "broken.json").string(), "not valid JSON"},
      {"field", "--config " + noheads.string(), "num_attention_heads"},
      {"moe16b", "--config " + std::string(MOEKIT_SOURCE_DIR) + "/configs/deepseek-moe-16b.json",
       "\"deepseek\" (DeepSeekMoE) is not supported"},
      {"dtype", "--config " + good.string() + " --dtype f8", "--dtype"},
      {"shard", "--config " + good.string() + " --shard-size 5XB", "--shard-size"},
      {"tokenizer", "--config " + good.string() + " --tokenizer " + (dir / "no.json").string(),
       "no.json"},
      {"disk", "--config " + huge.string(), "not enough free disk space"},
  };
  for (const auto& c : cases) {
    const fs::path out = dir / ("out-" + c.name);
    auto r = run_moekit("init " + c.args + " --out " + out.string());
    EXPECT_EQ(r.rc, 2) << c.name;
    EXPECT_EQ(test::count_lines(r.err), 1) << c.name << ": " << r.err;
    EXPECT_NE(r.err.find(c.expect), std::string::npos) << c.name << ": " << r.err;
    if (c.name == "disk") {
      EXPECT_NE(r.err.find(out.string()), std::string::npos) << r.err;
    }
    EXPECT_FALSE(fs::exists(out)) << c.name;
  }
}

TEST(InitCli, RefusesAnExistingCheckpointAndCleansUpAFailedWrite) {
  test::TempDir dir;
  // Dense layer 0's gate_proj: 20000 x 32 bf16 = 1.28 MB, in a shard after the first.
  auto cfg = config_from(dir, "v2_lite", [](json& j) { j["intermediate_size"] = 20000; });
  ASSERT_EQ(init(cfg, dir / "m").rc, 0);
  const std::string before = test::read_text(dir / "m/model.safetensors");
  auto again = init(cfg, dir / "m", "--seed 1");
  EXPECT_EQ(again.rc, 2);
  EXPECT_NE(again.err.find("already holds a checkpoint"), std::string::npos) << again.err;
  EXPECT_EQ(test::read_text(dir / "m/model.safetensors"), before);
  // A write that fails half way (a 1 MiB file size limit, as a full disk) removes the shards it
  // wrote and the folder.
  auto r = test::run_moekit_limited(
      "init --config " + cfg.string() + " --out " + (dir / "x").string() + " --shard-size 100000",
      1024);
  EXPECT_EQ(r.rc, 2);
  EXPECT_EQ(test::count_lines(r.err), 1) << r.err;
  EXPECT_FALSE(fs::exists(dir / "x"));
}

// Dry runs of every config in configs/: the counts `init` prints, against published sizes.
TEST(InitCli, DryRunOfEveryPublishedConfig) {
  const std::map<std::string, double> published = {
      {"deepseek-v2-lite.json", 15.7e9}, {"deepseek-coder-v2-lite.json", 15.7e9},
      {"deepseek-v2.json", 236e9},       {"deepseek-v3.json", 671e9},
      {"moekit-demo.json", 2.73e6},
  };
  const fs::path configs = fs::path(MOEKIT_SOURCE_DIR) / "configs";
  int checked = 0;
  for (const auto& e : fs::directory_iterator(configs)) {
    const std::string file = e.path().filename().string();
    auto r = run_moekit("init --dry-run --config " + e.path().string());
    if (file == "deepseek-moe-16b.json") {  // DeepSeekMoE's MHA: not implemented (README)
      EXPECT_EQ(r.rc, 2);
      EXPECT_NE(r.err.find("not implemented"), std::string::npos) << r.err;
      continue;
    }
    ASSERT_EQ(r.rc, 0) << file << ": " << r.err;
    ASSERT_TRUE(published.count(file)) << file << ": add its published size to this test";
    std::smatch m;
    ASSERT_TRUE(std::regex_search(r.out, m, std::regex(R"(parameters\s+(\d+))"))) << r.out;
    const double params = std::stod(m[1]);
    EXPECT_NEAR(params / published.at(file), 1.0, 0.01) << file << ": " << params;
    ASSERT_TRUE(std::regex_search(r.out, m, std::regex(R"(bytes\s+(\d+))"))) << r.out;
    EXPECT_NEAR(std::stod(m[1]) / (2.0 * params), 1.0, 0.01) << file;  // bf16 + headers
    ++checked;
  }
  EXPECT_EQ(checked, int(published.size()));
}

}  // namespace
}  // namespace moekit
