// `--device cpu|cuda` on train, finetune, forward and generate: a bad value or a missing GPU is a
// one-line error with exit status 2; on a GPU, the commands give the CPU's results (GpuCli tests,
// skipped without a GPU).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "../esft/esft_fixture.h"
#include "../temp_dir.h"
#include "../train/train_fixture.h"
#include "model/safetensors.h"
#include "ops/ops.h"
#include "run_cli.h"

namespace moekit {
namespace {

namespace fs = std::filesystem;

const std::string kFixture = std::string(MOEKIT_SOURCE_DIR) + "/tests/fixtures/parity/v2_lite";

std::string forward_args(const fs::path& out, const std::string& device) {
  return "forward --model " + kFixture + " --input " + kFixture + "/ids.json --out " +
         out.string() + " --device " + device;
}

bool one_line(const std::string& s) {
  return !s.empty() && s.find('\n') == s.size() - 1;
}

TEST(DeviceCli, UnknownDeviceIsRefused) {
  test::TempDir tmp;
  auto r = test::run_moekit(forward_args(tmp.path() / "l.safetensors", "tpu"));
  EXPECT_EQ(r.rc, 2);
  EXPECT_TRUE(one_line(r.err)) << r.err;
  EXPECT_NE(r.err.find("--device"), std::string::npos) << r.err;
}

TEST(DeviceCli, CudaWithoutGpuIsAOneLineError) {
  if (backend_available(Device::CUDA)) GTEST_SKIP() << "a GPU is visible";
  test::TempDir tmp;
  for (const std::string& args :
       {forward_args(tmp.path() / "l.safetensors", "cuda"),
        "generate --model " + kFixture + " --prompt hi --tokenizer none --device cuda",
        "finetune --model " + kFixture + " --data none.jsonl --method full --device cuda",
        "train --config " + kFixture + "/config.json --data none --out " +
            (tmp.path() / "run").string() + " --device cuda"}) {
    auto r = test::run_moekit(args);
    EXPECT_EQ(r.rc, 2) << args;
    EXPECT_TRUE(one_line(r.err)) << r.err;
    EXPECT_NE(r.err.find("CUDA"), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(tmp.path() / "l.safetensors"));
  }
}

TEST(DeviceCli, Bf16NeedsCuda) {
  test::TempDir tmp;
  auto r = test::run_moekit(forward_args(tmp.path() / "l.safetensors", "cpu") + " --dtype bf16");
  EXPECT_EQ(r.rc, 2);
  EXPECT_TRUE(one_line(r.err)) << r.err;
  EXPECT_NE(r.err.find("--dtype bf16 needs --device cuda"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(tmp.path() / "l.safetensors"));
}

class GpuCli : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!backend_available(Device::CUDA))
      GTEST_SKIP() << "CUDA backend not available (built without CUDA, or no GPU visible)";
  }
};

double printed_loss(const std::string& out) {
  return nlohmann::json::parse(out).at("loss").get<double>();
}

TEST_F(GpuCli, ForwardMatchesCpu) {
  test::TempDir tmp;
  auto rc = test::run_moekit(forward_args(tmp.path() / "cpu.safetensors", "cpu"));
  auto rg = test::run_moekit(forward_args(tmp.path() / "gpu.safetensors", "cuda"));
  ASSERT_EQ(rc.rc, 0) << rc.err;
  ASSERT_EQ(rg.rc, 0) << rg.err;
  EXPECT_NEAR(printed_loss(rg.out), printed_loss(rc.out), 1e-5 * printed_loss(rc.out));
  auto a = SafetensorsFile::open(tmp.path() / "cpu.safetensors");
  auto b = SafetensorsFile::open(tmp.path() / "gpu.safetensors");
  const Tensor& la = a.tensors().at("logits").tensor;
  const Tensor& lb = b.tensors().at("logits").tensor;
  ASSERT_EQ(la.numel(), lb.numel());
  double d = 0, m = 0;
  for (int64_t i = 0; i < la.numel(); ++i) {
    d = std::max(d, double(std::abs(la.f32()[i] - lb.f32()[i])));
    m = std::max(m, double(std::abs(la.f32()[i])));
  }
  EXPECT_LE(d / m, 1e-5);
}

// MOEKIT_CUDA_FP32_GEMM: tf32 / bf16 let cuBLAS round the F32 GEMMs' inputs to 10 / 8 mantissa
// bits (fp32 accumulation). Logits then differ from the exact run by about the input rounding
// (2^-11 / 2^-9 relative per product, growing like sqrt(K) over a dot product): well above fp32's
// 1e-5, well below 5e-2 for these small widths. A bad value is a one-line error.
TEST_F(GpuCli, Fp32GemmPrecisionModes) {
  test::TempDir tmp;
  auto exact = test::run_moekit(forward_args(tmp.path() / "fp32.safetensors", "cuda"));
  ASSERT_EQ(exact.rc, 0) << exact.err;
  auto logits = [](const fs::path& f) {
    auto st = SafetensorsFile::open(f);
    return st.tensors().at("logits").tensor.to_f32();
  };
  const Tensor ref = logits(tmp.path() / "fp32.safetensors");
  double ref_max = 0;
  for (int64_t i = 0; i < ref.numel(); ++i)
    ref_max = std::max(ref_max, double(std::abs(ref.f32()[i])));
  for (const std::string mode : {"tf32", "bf16"}) {
    const fs::path out = tmp.path() / (mode + ".safetensors");
    auto r =
        test::run_moekit_wrapped("MOEKIT_CUDA_FP32_GEMM=" + mode + " ", forward_args(out, "cuda"));
    ASSERT_EQ(r.rc, 0) << mode << ": " << r.err;
    const Tensor t = logits(out);
    double d = 0;
    for (int64_t i = 0; i < t.numel(); ++i)
      d = std::max(d, double(std::abs(t.f32()[i] - ref.f32()[i])));
    std::printf("[ gpu-gemm ] %s: logits differ from fp32 by %.2e (relative to max |logit|)\n",
                mode.c_str(), d / ref_max);
    EXPECT_LT(d / ref_max, 5e-2) << mode;
    EXPECT_GT(d, 0.0) << mode << ": the mode changed nothing (was it applied?)";
  }
  auto bad = test::run_moekit_wrapped("MOEKIT_CUDA_FP32_GEMM=fp8 ",
                                      forward_args(tmp.path() / "bad.safetensors", "cuda"));
  EXPECT_EQ(bad.rc, 2);
  EXPECT_TRUE(one_line(bad.err)) << bad.err;
  EXPECT_NE(bad.err.find("MOEKIT_CUDA_FP32_GEMM"), std::string::npos) << bad.err;
  EXPECT_FALSE(fs::exists(tmp.path() / "bad.safetensors"));
}

TEST_F(GpuCli, EsftFinetuneMatchesCpu) {
  test::TempDir tmp;
  const fs::path base = test::make_task_and_base(tmp.path(), 60, 0.2f);
  std::ofstream(tmp.path() / "cfg.json")
      << R"({"experts": {"1": [2, 5]}, "shared_experts": false, "non_expert_modules": false})";
  auto run = [&](const std::string& device) {
    return test::run_moekit("finetune --model " + base.string() + " --data " +
                            (tmp.path() / "task.jsonl").string() + " --method esft --experts " +
                            (tmp.path() / "cfg.json").string() + " --out " +
                            (tmp.path() / device).string() +
                            " --steps 3 --seq 64 --accumulation 2 --lr 1e-3 --device " + device);
  };
  auto rc = run("cpu"), rg = run("cuda");
  ASSERT_EQ(rc.rc, 0) << rc.err;
  ASSERT_EQ(rg.rc, 0) << rg.err;
  auto a = SafetensorsFile::open(tmp.path() / "cpu/adapter.safetensors");
  auto b = SafetensorsFile::open(tmp.path() / "cuda/adapter.safetensors");
  ASSERT_EQ(a.tensors().size(), 6u);
  ASSERT_EQ(b.tensors().size(), 6u);
  for (const auto& [name, e] : a.tensors()) {
    const Tensor& x = e.tensor;
    const Tensor& y = b.tensors().at(name).tensor;
    double d = 0, m = 0;
    for (int64_t i = 0; i < x.numel(); ++i) {
      d = std::max(d, double(std::abs(x.f32()[i] - y.f32()[i])));
      m = std::max(m, double(std::abs(x.f32()[i])));
    }
    EXPECT_LE(d / m, 1e-4) << name;
  }
}

// --dtype bf16: the same forward with bf16 weights and tensor-core GEMMs/attention. The fixture's
// fp32 weights are rounded to bf16 and every GEMM input too (2^-8 relative each), so the loss
// moves by well under 2e-2 of itself; ESFT fine-tuning runs and its adapter (fp32 masters of the
// trained experts) stays within 1e-2 of the fp32 run's (three small steps from the same start,
// rounded to bf16: 2^-8 = 4e-3 of each weight).
TEST_F(GpuCli, Bf16ForwardAndEsftFinetune) {
  test::TempDir tmp;
  auto exact = test::run_moekit(forward_args(tmp.path() / "fp32.safetensors", "cuda"));
  auto bf16 =
      test::run_moekit(forward_args(tmp.path() / "bf16.safetensors", "cuda") + " --dtype bf16");
  ASSERT_EQ(exact.rc, 0) << exact.err;
  ASSERT_EQ(bf16.rc, 0) << bf16.err;
  const double le = printed_loss(exact.out), lb = printed_loss(bf16.out);
  std::printf("[ gpu-bf16 ] forward loss fp32 %.6f, bf16 %.6f\n", le, lb);
  EXPECT_LE(std::abs(lb - le) / le, 2e-2);
  EXPECT_NE(lb, le) << "--dtype bf16 had no effect";

  const fs::path base = test::make_task_and_base(tmp.path(), 60, 0.2f);
  std::ofstream(tmp.path() / "cfg.json")
      << R"({"experts": {"1": [2, 5]}, "shared_experts": false, "non_expert_modules": false})";
  auto run = [&](const std::string& name, const std::string& dtype) {
    return test::run_moekit(
        "finetune --model " + base.string() + " --data " + (tmp.path() / "task.jsonl").string() +
        " --method esft --experts " + (tmp.path() / "cfg.json").string() + " --out " +
        (tmp.path() / name).string() +
        " --steps 3 --seq 64 --accumulation 2 --lr 1e-3 --device cuda --dtype " + dtype);
  };
  auto r32 = run("a32", "fp32"), r16 = run("a16", "bf16");
  ASSERT_EQ(r32.rc, 0) << r32.err;
  ASSERT_EQ(r16.rc, 0) << r16.err;
  auto a = SafetensorsFile::open(tmp.path() / "a32/adapter.safetensors");
  auto b = SafetensorsFile::open(tmp.path() / "a16/adapter.safetensors");
  ASSERT_EQ(b.tensors().size(), 6u);
  for (const auto& [name, e] : a.tensors()) {
    const Tensor& x = e.tensor;
    const Tensor y = b.tensors().at(name).tensor.to_f32();
    double d = 0, m = 0;
    for (int64_t i = 0; i < x.numel(); ++i) {
      d = std::max(d, double(std::abs(x.f32()[i] - y.f32()[i])));
      m = std::max(m, double(std::abs(x.f32()[i])));
    }
    EXPECT_LE(d / m, 1e-2) << name;
  }

  // The base is an fp32 checkpoint: its bf16 model (embedding and LM head in bf16 too) holds
  // rounded values, yet each adapter applies to the other storage (base_fingerprint_bf16).
  std::ofstream(tmp.path() / "ids.json") << R"({"ids": [[0, 5, 9, 13, 77, 2, 1, 40]]})";
  auto forward = [&](const std::string& adapter, const std::string& device_args) {
    return test::run_moekit(
        "forward --model " + base.string() + " --adapter " + (tmp.path() / adapter).string() +
        " --input " + (tmp.path() / "ids.json").string() + " --out " +
        (tmp.path() / (adapter + ".logits.safetensors")).string() + " " + device_args);
  };
  auto on_cpu = forward("a16", "--device cpu");
  EXPECT_EQ(on_cpu.rc, 0) << on_cpu.err;
  auto on_bf16 = forward("a32", "--device cuda --dtype bf16");
  EXPECT_EQ(on_bf16.rc, 0) << on_bf16.err;

  // Full fine-tuning under --dtype bf16: every matrix, the embedding and the LM head included,
  // trains as an fp32 master (AdamW takes fp32 weights only), and all of them move.
  auto full = test::run_moekit("finetune --model " + base.string() + " --data " +
                               (tmp.path() / "task.jsonl").string() + " --method full --out " +
                               (tmp.path() / "full").string() +
                               " --steps 2 --seq 64 --accumulation 1 --lr 1e-2 --device cuda "
                               "--dtype bf16");
  ASSERT_EQ(full.rc, 0) << full.err;
  auto before = SafetensorsFile::open(base / "model.safetensors");
  auto after = SafetensorsFile::open(tmp.path() / "full/model.safetensors");
  for (const std::string name :
       {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"}) {
    const Tensor x = before.tensors().at(name).tensor.to_f32();
    const Tensor y = after.tensors().at(name).tensor.to_f32();
    ASSERT_EQ(x.numel(), y.numel()) << name;
    double moved = 0;
    for (int64_t i = 0; i < x.numel(); ++i) moved += std::abs(x.f32()[i] - y.f32()[i]);
    EXPECT_GT(moved, 0.0) << name << " did not train";
  }
}

TEST_F(GpuCli, TrainRunsAndResumes) {
  test::TempDir tmp;
  const fs::path data = test::make_train_data(tmp.path() / "data");
  const std::string cfg = std::string(MOEKIT_SOURCE_DIR) + "/tests/fixtures/train/tiny.json";
  auto run = [&](const std::string& device, int steps, const std::string& extra) {
    return test::run_moekit("train --config " + cfg + " --data " + data.string() + " --out " +
                            (tmp.path() / device).string() + " --steps " + std::to_string(steps) +
                            " --batch 2 --seq 32 --eval-every 4 --eval-batches 2 --save-every 2 " +
                            "--log-every 1 --device " + device + extra);
  };
  auto rc = run("cpu", 4, ""), rg = run("cuda", 4, "");
  ASSERT_EQ(rc.rc, 0) << rc.err;
  ASSERT_EQ(rg.rc, 0) << rg.err;
  // Per-step losses from metrics.jsonl agree with the CPU run.
  auto losses = [&](const std::string& device) {
    std::vector<double> out;
    std::ifstream in(tmp.path() / device / "metrics.jsonl");
    std::string line;
    while (std::getline(in, line))
      if (auto j = nlohmann::json::parse(line); j.contains("loss")) out.push_back(j["loss"]);
    return out;
  };
  const auto lc = losses("cpu"), lg = losses("cuda");
  ASSERT_EQ(lc.size(), lg.size());
  for (size_t i = 0; i < lc.size(); ++i) EXPECT_NEAR(lg[i], lc[i], 1e-4 * lc[i]) << i;
  // A GPU run resumes from its checkpoint (AdamW moments go back to the GPU).
  auto rr = run("cuda", 6, " --resume");
  ASSERT_EQ(rr.rc, 0) << rr.err;
  EXPECT_NE(rr.out.find("resuming from"), std::string::npos) << rr.out;
}

}  // namespace
}  // namespace moekit
