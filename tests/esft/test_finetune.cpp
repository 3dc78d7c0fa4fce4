// ESFT fine-tuning: only the chosen experts change and only they have gradients and optimizer
// state; the adapter holds exactly those tensors. Bad expert configs are refused.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>

#include "../cli/run_cli.h"
#include "../temp_dir.h"
#include "core/error.h"
#include "esft/adapter.h"
#include "esft/finetune.h"
#include "esft_fixture.h"
#include "model/checkpoint.h"

namespace moekit {
namespace {

namespace fs = std::filesystem;

fs::path make_base(const fs::path& root) {
  return test::make_task_and_base(root, 60, 0.2f);
}

TEST(EsftFinetune, OnlyChosenExpertsTrainAndAreAllocated) {
  test::TempDir tmp;
  const fs::path base = make_base(tmp.path());
  std::ofstream(tmp.path() / "cfg.json")
      << R"({"experts": {"1": [2, 5]}, "shared_experts": false, "non_expert_modules": false})";
  auto r = test::run_moekit(
      "finetune --model " + base.string() + " --data " + (tmp.path() / "task.jsonl").string() +
      " --method esft --experts " + (tmp.path() / "cfg.json").string() + " --out " +
      (tmp.path() / "adapter").string() + " --steps 5 --seq 64 --accumulation 2 --lr 1e-2");
  ASSERT_EQ(r.rc, 0) << r.err;
  // 2 experts x 3 matrices x (16 x 32) = 3072 trainable parameters; gradients 12 KiB.
  EXPECT_NE(r.out.find("finetune (esft): 3072 of"), std::string::npos) << r.out;
  auto before = load_model(base);
  auto adapter = SafetensorsFile::open(tmp.path() / "adapter/adapter.safetensors");
  ASSERT_EQ(adapter.tensors().size(), 6u);
  for (const auto& p : before->params().all()) {
    auto it = adapter.tensors().find(p->name);
    const bool chosen = p->name.find("layers.1.mlp.experts.2.") != std::string::npos ||
                        p->name.find("layers.1.mlp.experts.5.") != std::string::npos;
    EXPECT_EQ(it != adapter.tensors().end(), chosen) << p->name;
    if (chosen) {
      Tensor after = it->second.tensor.to_f32();
      double moved = 0;
      for (int64_t i = 0; i < after.numel(); ++i)
        moved += std::abs(after.f32()[i] - p->value.f32()[i]);
      EXPECT_GT(moved, 0.0) << p->name << " did not train";
    }
  }
}

TEST(EsftFinetune, OnlyChosenExpertsHaveGradientsAndEnterTheAdapter) {
  test::TempDir tmp;
  const fs::path base = make_base(tmp.path());
  auto model = load_model(base);
  ExpertConfig cfg;
  cfg.experts[1] = {0};
  apply_expert_config(*model, cfg, "cfg");
  model->params().allocate_grads();
  int64_t with_grad = 0;
  for (const auto& p : model->params().all()) with_grad += p->grad.defined();
  EXPECT_EQ(with_grad, 3);  // gate_proj, up_proj, down_proj of expert 0
  EXPECT_EQ(model->params().grad_bytes(), 3u * 16 * 32 * 4);

  // The adapter holds the chosen expert's tensors and nothing else.
  std::ofstream(tmp.path() / "cfg.json") << cfg.to_json_text();
  auto r = test::run_moekit(
      "finetune --model " + base.string() + " --data " + (tmp.path() / "task.jsonl").string() +
      " --method esft --experts " + (tmp.path() / "cfg.json").string() + " --out " +
      (tmp.path() / "a").string() + " --steps 3 --seq 64 --accumulation 1 --lr 1e-2");
  ASSERT_EQ(r.rc, 0) << r.err;
  auto adapter = SafetensorsFile::open(tmp.path() / "a/adapter.safetensors");
  for (const auto& [name, e] : adapter.tensors())
    EXPECT_NE(name.find("layers.1.mlp.experts.0."), std::string::npos) << name;
}

// Merged checkpoint == base + adapter at load, bit for bit; an adapter refuses another base.
TEST(EsftAdapter, MergeEqualsApplyAndOtherBasesAreRefused) {
  test::TempDir tmp;
  const fs::path base = make_base(tmp.path());
  std::ofstream(tmp.path() / "cfg.json")
      << R"({"experts": {"1": [1, 3]}, "shared_experts": true, "non_expert_modules": false})";
  auto r = test::run_moekit(
      "finetune --model " + base.string() + " --data " + (tmp.path() / "task.jsonl").string() +
      " --method esft --experts " + (tmp.path() / "cfg.json").string() + " --out " +
      (tmp.path() / "ad").string() + " --steps 3 --seq 64 --accumulation 1 --lr 1e-2");
  ASSERT_EQ(r.rc, 0) << r.err;
  r = test::run_moekit("esft merge --model " + base.string() + " --adapter " +
                       (tmp.path() / "ad").string() + " --out " + (tmp.path() / "merged").string());
  ASSERT_EQ(r.rc, 0) << r.err;
  std::ofstream(tmp.path() / "ids.json") << R"({"ids": [[0, 5, 9, 13, 77, 2, 1, 40]]})";
  auto a = test::run_moekit("forward --model " + (tmp.path() / "merged").string() + " --input " +
                            (tmp.path() / "ids.json").string() + " --out " +
                            (tmp.path() / "l1.safetensors").string());
  auto b = test::run_moekit("forward --model " + base.string() + " --adapter " +
                            (tmp.path() / "ad").string() + " --input " +
                            (tmp.path() / "ids.json").string() + " --out " +
                            (tmp.path() / "l2.safetensors").string());
  auto c = test::run_moekit("forward --model " + base.string() + " --input " +
                            (tmp.path() / "ids.json").string() + " --out " +
                            (tmp.path() / "l3.safetensors").string());
  ASSERT_EQ(a.rc, 0) << a.err;
  ASSERT_EQ(b.rc, 0) << b.err;
  EXPECT_EQ(a.out, b.out);
  EXPECT_NE(a.out, c.out);  // the adapter changes the model
  auto la = SafetensorsFile::open(tmp.path() / "l1.safetensors"),
       lb = SafetensorsFile::open(tmp.path() / "l2.safetensors");
  const Tensor &ta = la.tensors().at("logits").tensor, &tb = lb.tensors().at("logits").tensor;
  EXPECT_EQ(std::string(static_cast<const char*>(ta.raw()), ta.nbytes()),
            std::string(static_cast<const char*>(tb.raw()), tb.nbytes()));
  // Another base (different weights, same shapes): refused with the adapter file named.
  ModelConfig cfg = load_config(base / "config.json");
  DeepSeekModel other(cfg);
  other.init_random(99, 0.2f);
  save_model(other, tmp.path() / "other");
  r = test::run_moekit("forward --model " + (tmp.path() / "other").string() + " --adapter " +
                       (tmp.path() / "ad").string() + " --input " +
                       (tmp.path() / "ids.json").string() + " --out " +
                       (tmp.path() / "l4.safetensors").string());
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("adapter.safetensors: adapter was trained on another base model"),
            std::string::npos)
      << r.err;
  EXPECT_FALSE(fs::exists(tmp.path() / "l4.safetensors"));
}

TEST(EsftFinetune, BadExpertConfigsAreRefused) {
  test::TempDir tmp;
  const fs::path base = make_base(tmp.path());
  struct Case {
    std::string cfg, expect;
  };
  for (const Case& c : {Case{R"({"experts": {"0": [1]}})", "layer 0 is not a MoE layer"},
                        Case{R"({"experts": {"7": [1]}})", "layer 7 is not a MoE layer"},
                        Case{R"({"experts": {"1": [99]}})", "layer 1 names expert 99"},
                        Case{R"({"experts": {"x": [1]}})", "must be a layer number"}}) {
    std::ofstream(tmp.path() / "cfg.json") << c.cfg;
    auto r = test::run_moekit(
        "finetune --model " + base.string() + " --data " + (tmp.path() / "task.jsonl").string() +
        " --method esft --experts " + (tmp.path() / "cfg.json").string() + " --out " +
        (tmp.path() / "out").string() + " --steps 1 --seq 32 --accumulation 1");
    EXPECT_EQ(r.rc, 2) << c.cfg;
    EXPECT_NE(r.err.find("cfg.json"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(c.expect), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(tmp.path() / "out/adapter.safetensors"));
  }
  std::ofstream(tmp.path() / "noassist.jsonl")
      << R"({"messages": [{"role": "user", "content": "q"}]})"
      << "\n";
  auto r = test::run_moekit("finetune --model " + base.string() + " --data " +
                            (tmp.path() / "noassist.jsonl").string() + " --method full --out " +
                            (tmp.path() / "o2").string() + " --steps 1 --seq 32 --accumulation 1");
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("noassist.jsonl:1: row has no user and assistant message"),
            std::string::npos)
      << r.err;
}

// The fingerprint before embeddings and LM heads could be bf16: FNV-1a over the config's JSON and
// the first 64 KiB of each tensor's stored (fp32) bytes. An fp32 model must hash to exactly this,
// or adapters made before would stop applying.
std::string legacy_fingerprint(const DeepSeekModel& m) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](const void* p, size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  };
  const std::string cfg = config_to_json(m.config()).dump();
  mix(cfg.data(), cfg.size());
  for (const char* name : {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}) {
    const Tensor host = m.params().at(name).value.to_host();
    mix(host.raw(), std::min<size_t>(host.nbytes(), 1 << 16));
  }
  return fmt::format("{:016x}", h);
}

// A small model whose tables hold more than the 16384 hashed values, in rows of 40 (the cut falls
// inside a row), and one whose tables hold fewer (all of them hashed).
std::vector<ModelConfig> fingerprint_configs() {
  ModelConfig big = load_config(std::string(MOEKIT_SOURCE_DIR) + "/tests/fixtures/train/tiny.json");
  big.vocab_size = 1000;
  big.hidden_size = 40;
  ModelConfig small =
      load_config(std::string(MOEKIT_SOURCE_DIR) + "/tests/fixtures/train/tiny.json");
  return {big, small};
}

// Rounds the fingerprinted tensors' values to bf16 (what a bf16 model of this checkpoint holds).
void round_fingerprinted_to_bf16(DeepSeekModel& m) {
  for (const char* name : {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}) {
    Param& p = m.params().at(name);
    p.value.copy_from(p.value.to_dtype(DType::BF16).to_f32());
  }
}

TEST(EsftAdapter, FingerprintOfFp32ModelIsUnchanged) {
  for (const ModelConfig& c : fingerprint_configs()) {
    SCOPED_TRACE(c.vocab_size);
    DeepSeekModel m(c);
    m.init_random(5, 0.2f);
    EXPECT_EQ(base_fingerprint(m), legacy_fingerprint(m));
    // Random fp32 values are not bf16 values: rounding changes the hash...
    EXPECT_NE(base_fingerprint(m, true), base_fingerprint(m));
    // ...and once they are (a bf16 checkpoint loaded in fp32), the exact and the rounded hash
    // agree, so fp32 and bf16 storage of that checkpoint fingerprint alike.
    round_fingerprinted_to_bf16(m);
    EXPECT_EQ(base_fingerprint(m, true), base_fingerprint(m));
    EXPECT_EQ(base_fingerprint(m), legacy_fingerprint(m));
  }
}

TEST(EsftAdapter, FingerprintHashesOnlyTheLeadingValues) {
  const ModelConfig c = fingerprint_configs()[0];
  DeepSeekModel m(c);
  m.init_random(5, 0.2f);
  const std::string before = base_fingerprint(m);
  Param& embed = m.params().at("model.embed_tokens.weight");
  // Value 16383 (row 409, column 23) is hashed, value 16384 is not.
  const auto set = [&](int64_t i, float v) {
    Tensor t = embed.value.clone();
    t.f32()[i] = v;
    embed.value.copy_from(t);
  };
  set(16384, 123.0f);
  EXPECT_EQ(base_fingerprint(m), before);
  set(16383, 123.0f);
  EXPECT_NE(base_fingerprint(m), before);
}

// An adapter names its base by fingerprint: trained and applied with the same storage, or across
// fp32 and bf16 storage of an fp32 checkpoint (whose bf16 model holds rounded values) both ways;
// another base is refused. The bf16 model is stood in for by the fp32 model holding the rounded
// values, which fingerprints the same (the hash reads values as fp32).
TEST(EsftAdapter, FingerprintAcceptsTheSameBaseInEitherStorage) {
  test::TempDir tmp;
  const ModelConfig c = fingerprint_configs()[0];
  DeepSeekModel exact(c), rounded(c), other(c);
  exact.init_random(5, 0.2f);
  rounded.init_random(5, 0.2f);
  round_fingerprinted_to_bf16(rounded);
  other.init_random(6, 0.2f);
  const std::string name = "model.layers.1.mlp.experts.2.up_proj.weight";
  const Tensor trained = exact.params().at(name).value.clone();
  int n = 0;
  auto adapter = [&](const DeepSeekModel& base, bool with_bf16) {
    const fs::path dir = tmp.path() / ("a" + std::to_string(n++));
    fs::create_directories(dir);
    std::map<std::string, std::string> meta = {{"base_fingerprint", base_fingerprint(base)}};
    if (with_bf16) meta["base_fingerprint_bf16"] = base_fingerprint(base, true);
    save_safetensors(dir / "adapter.safetensors", {{name, trained}}, meta);
    return dir;
  };
  auto applies = [&](DeepSeekModel& m, const fs::path& dir) {
    try {
      apply_adapter(m, dir);
      return true;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("adapter was trained on another base model"),
                std::string::npos)
          << e.what();
      return false;
    }
  };
  EXPECT_TRUE(applies(exact, adapter(exact, true)));
  EXPECT_TRUE(applies(exact, adapter(exact, false)));     // made before base_fingerprint_bf16
  EXPECT_TRUE(applies(exact, adapter(rounded, true)));    // trained with --dtype bf16
  EXPECT_TRUE(applies(rounded, adapter(exact, true)));    // applied with --dtype bf16
  EXPECT_FALSE(applies(rounded, adapter(exact, false)));  // an old adapter has no bf16 record
  EXPECT_TRUE(applies(rounded, adapter(rounded, false)));
  EXPECT_FALSE(applies(other, adapter(exact, true)));
  EXPECT_FALSE(applies(exact, adapter(other, true)));
}

}  // namespace
}  // namespace moekit
