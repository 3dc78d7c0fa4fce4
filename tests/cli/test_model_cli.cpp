// `moekit forward` / `moekit info` contracts and their bad-input behaviour: one line naming the
// file and the problem, exit status 2, no partial output file.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "model/checkpoint.h"
#include "run_cli.h"

namespace moekit {
namespace {

namespace fs = std::filesystem;
using test::run_moekit;

const std::string kFix = std::string(MOEKIT_SOURCE_DIR) + "/tests/fixtures/parity/";

void write(const fs::path& p, const std::string& s) {
  std::ofstream(p, std::ios::binary) << s;
}

TEST(ForwardCli, WritesLogitsAndPrintsLossLast) {
  auto dir = test::temp_dir("fwd");
  auto r = run_moekit("forward --model " + kFix + "v3_yarn --input " + kFix +
                      "v3_yarn/ids.json --out " + (dir / "logits.safetensors").string());
  ASSERT_EQ(r.rc, 0) << r.err;
  // The last stdout line is {"loss": X}, X the reference loss.
  std::string last = r.out.substr(r.out.rfind('\n', r.out.size() - 2) + 1);
  auto j = nlohmann::json::parse(last);
  auto ref = SafetensorsFile::open(kFix + "v3_yarn/reference.safetensors");
  const float ref_loss = ref.tensors().at("loss").tensor.to_f32().f32()[0];
  EXPECT_NEAR(j["loss"].get<double>(), ref_loss, 1e-5 * ref_loss);
  auto out = SafetensorsFile::open(dir / "logits.safetensors");
  ASSERT_EQ(out.tensors().size(), 1u);
  const Tensor& logits = out.tensors().at("logits").tensor;
  EXPECT_EQ(logits.dtype(), DType::F32);
  EXPECT_EQ(logits.shape(), (Shape{2, 12, 96}));
  Tensor want = ref.tensors().at("logits").tensor.to_f32();
  double d = 0;
  for (int64_t i = 0; i < want.numel(); ++i)
    d = std::max(d, double(std::abs(logits.data<float>()[i] - want.f32()[i])));
  EXPECT_LE(d, 1e-4);
  fs::remove_all(dir);
}

TEST(InfoCli, ReportsCountsAndLayers) {
  auto r = run_moekit("info --model " + kFix + "v2_lite");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.out.find("deepseek_v2"), std::string::npos);
  EXPECT_NE(r.out.find("8 routed + 2 shared"), std::string::npos);
  EXPECT_NE(r.out.find("moe"), std::string::npos);
}

struct BadCase {
  std::string name, ids, expect;  // ids.json text, substring of the error
};

TEST(ForwardCli, BadIdsFilesFailCleanly) {
  const std::vector<BadCase> cases = {
      {"ragged", R"({"ids": [[1, 2, 3], [4, 5]]})", "rectangular"},
      {"range", R"({"ids": [[1, 2, 96]]})", "out of range"},
      {"negative", R"({"ids": [[1, -1]]})", "out of range"},
      {"notjson", R"({"ids": [[1, 2)", "not valid JSON"},
      {"noids", R"({"tokens": [[1]]})", "missing field \"ids\""},
      {"empty", R"({"ids": []})", "non-empty"},
      {"float", R"({"ids": [[1, 2.5]]})", "not an integer"},
  };
  auto dir = test::temp_dir("badids");
  for (const auto& c : cases) {
    auto in = dir / (c.name + ".json");
    write(in, c.ids);
    auto out = dir / (c.name + ".safetensors");
    auto r = run_moekit("forward --model " + kFix + "v2_lite --input " + in.string() + " --out " +
                        out.string());
    EXPECT_EQ(r.rc, 2) << c.name;
    EXPECT_EQ(test::count_lines(r.err), 1) << c.name << ": " << r.err;
    EXPECT_NE(r.err.find(in.string()), std::string::npos) << c.name << ": " << r.err;
    EXPECT_NE(r.err.find(c.expect), std::string::npos) << c.name << ": " << r.err;
    EXPECT_FALSE(fs::exists(out)) << c.name << ": partial output";
  }
  auto r =
      run_moekit("forward --model " + kFix + "v2_lite --input " + (dir / "absent.json").string() +
                 " --out " + (dir / "x.safetensors").string());
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("absent.json"), std::string::npos);
  fs::remove_all(dir);
}

// Copies a fixture checkpoint, lets `edit` break it, and expects a one-line error naming `expect`.
void expect_bad_checkpoint(const std::string& tag, const std::function<void(const fs::path&)>& edit,
                           const std::string& expect) {
  auto dir = test::temp_dir("badckpt-" + tag);
  fs::copy(kFix + "v2_lite", dir / "model");
  edit(dir / "model");
  auto out = dir / "logits.safetensors";
  auto r = run_moekit("forward --model " + (dir / "model").string() + " --input " + kFix +
                      "v2_lite/ids.json --out " + out.string());
  EXPECT_EQ(r.rc, 2) << tag;
  EXPECT_EQ(test::count_lines(r.err), 1) << tag << ": " << r.err;
  EXPECT_NE(r.err.find(expect), std::string::npos) << tag << ": " << r.err;
  EXPECT_FALSE(fs::exists(out)) << tag;
  fs::remove_all(dir);
}

// Rewrites model.safetensors through `change` (name -> tensor map).
void rewrite(const fs::path& model,
             const std::function<void(std::map<std::string, Tensor>&)>& change) {
  std::map<std::string, Tensor> t;
  {
    auto f = SafetensorsFile::open(model / "model.safetensors");
    for (const auto& [n, e] : f.tensors()) t[n] = e.tensor.clone();
  }
  change(t);
  save_safetensors(model / "model.safetensors", {t.begin(), t.end()});
}

TEST(ForwardCli, BadCheckpointsFailCleanly) {
  const std::string gate = "model.layers.1.mlp.gate.weight";
  expect_bad_checkpoint(
      "missing", [&](const fs::path& m) { rewrite(m, [&](auto& t) { t.erase(gate); }); },
      "missing tensor " + gate);
  expect_bad_checkpoint(
      "extra",
      [&](const fs::path& m) {
        rewrite(m, [&](auto& t) { t["model.layers.0.mlp.bogus.weight"] = Tensor::zeros({2}); });
      },
      "unexpected tensor model.layers.0.mlp.bogus.weight");
  expect_bad_checkpoint(
      "shape",
      [&](const fs::path& m) { rewrite(m, [&](auto& t) {
                                 t[gate] = Tensor::zeros({8, 31});
                               }); },
      "has shape [8, 31], expected [8, 32]");
  expect_bad_checkpoint(
      "truncated",
      [&](const fs::path& m) {
        fs::resize_file(m / "model.safetensors", fs::file_size(m / "model.safetensors") / 2);
      },
      "model.safetensors");
  expect_bad_checkpoint(
      "no-config", [&](const fs::path& m) { fs::remove(m / "config.json"); }, "config.json");
  expect_bad_checkpoint(
      "model-type",
      [&](const fs::path& m) {
        auto j = nlohmann::json::parse(test::slurp(m / "config.json"));
        j["model_type"] = "llama4";
        write(m / "config.json", j.dump());
      },
      "llama4");
}

// transformers 5 may store experts fused: gate_up_proj [E, 2I, H] and down_proj [E, H, I].
TEST(Checkpoint, ReadsFusedExpertLayout) {
  auto dir = test::temp_dir("fused");
  fs::copy(kFix + "v2_lite", dir);
  rewrite(dir, [](std::map<std::string, Tensor>& t) {
    for (int layer : {1, 2}) {
      const std::string p = "model.layers." + std::to_string(layer) + ".mlp.experts.";
      Tensor gu = Tensor::empty({8, 32, 32}), down = Tensor::empty({8, 32, 16});
      for (int e = 0; e < 8; ++e) {
        const std::string q = p + std::to_string(e);
        Tensor g = t.at(q + ".gate_proj.weight").to_f32(), u = t.at(q + ".up_proj.weight").to_f32();
        Tensor d = t.at(q + ".down_proj.weight").to_f32();
        std::copy(g.f32(), g.f32() + 512, gu.f32() + e * 1024);
        std::copy(u.f32(), u.f32() + 512, gu.f32() + e * 1024 + 512);
        std::copy(d.f32(), d.f32() + 512, down.f32() + e * 512);
        for (auto w : {".gate_proj.weight", ".up_proj.weight", ".down_proj.weight"}) t.erase(q + w);
      }
      t[p + "gate_up_proj"] = gu;
      t[p + "down_proj"] = down;
    }
  });
  auto fused = load_model(dir);
  auto split = load_model(kFix + "v2_lite");
  for (const auto& p : split->params().all()) {
    const Tensor& a = p->value;
    const Tensor& b = fused->params().at(p->name).value;
    for (int64_t i = 0; i < a.numel(); ++i) ASSERT_EQ(a.f32()[i], b.f32()[i]) << p->name;
  }
  fs::remove_all(dir);
}

TEST(Checkpoint, SaveLoadRoundTripIsExact) {
  auto dir = test::temp_dir("roundtrip");
  auto m = load_model(kFix + "v3_yarn");
  save_model(*m, dir);
  auto again = load_model(dir);
  for (const auto& p : m->params().all()) {
    const Tensor& b = again->params().at(p->name).value;
    for (int64_t i = 0; i < p->value.numel(); ++i)
      ASSERT_EQ(p->value.f32()[i], b.f32()[i]) << p->name;
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moekit
