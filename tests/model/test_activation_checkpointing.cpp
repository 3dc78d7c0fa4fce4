// Activation checkpointing recomputes each layer's forward in backward: the gradients, the loss
// and the routing statistics must equal those of a plain run to the bit (every op is
// deterministic and nothing changes between forward and backward), for full training and for
// ESFT (frozen experts: no gradient either way). On the GPU too when one is visible.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>

#include "core/error.h"
#include "esft/finetune.h"
#include "model/checkpoint.h"
#include "model/summary.h"

namespace moekit {
namespace {

ModelConfig tiny() {
  ModelConfig c = load_config(std::string(MOEKIT_SOURCE_DIR) + "/tests/fixtures/train/tiny.json");
  c.vocab_size = 300;
  return c;
}

struct RunResult {
  float loss = 0;
  std::map<std::string, Tensor> grads;
  std::vector<std::vector<int64_t>> load;
};

// recompute: the MoE layers' expert gate/up recomputed in backward (set_expert_recompute).
RunResult run(Device dev, bool checkpointing, bool esft, bool recompute = false) {
  DeepSeekModel m(tiny(), dev);
  m.init_random(3, 0.2f);
  if (esft) {
    ExpertConfig ec;
    ec.experts[1] = {0, 3};
    apply_expert_config(m, ec, "cfg");
  }
  m.set_activation_checkpointing(checkpointing);
  m.set_expert_recompute(recompute);
  m.params().allocate_grads();
  const int64_t B = 2, S = 16;
  Tensor ids = Tensor::empty({B * S}, DType::I32);
  std::mt19937 rng(9);
  for (int64_t i = 0; i < B * S; ++i) ids.i32()[i] = int32_t(rng() % 300);
  Tensor logits = m.forward(ids, B, S);
  Tensor d = Tensor::empty(logits.shape(), DType::F32, dev);
  // Checkpointed, the first layer kept nothing for backward; plain, it kept its activations.
  EXPECT_EQ(m.layers()[0].self_attn.saved.q.defined(), !checkpointing);
  // The last layer keeps its activations even checkpointed (its backward comes first).
  EXPECT_TRUE(m.layers().back().moe.has_value());
  if (m.layers().back().moe) {
    EXPECT_EQ(m.layers().back().moe->saved.gate.defined(), !recompute);
  }
  RunResult r;
  r.loss = cross_entropy(backend(dev), logits, shifted_targets(ids, B, S), &d);
  for (auto& l : m.layers())
    if (l.moe) r.load.push_back(l.moe->expert_load);
  m.backward(d);
  for (const auto& p : m.params().all())
    if (p->grad.defined()) r.grads[p->name] = p->grad.to_host();
  return r;
}

void expect_identical(const RunResult& a, const RunResult& b) {
  EXPECT_EQ(a.loss, b.loss);
  EXPECT_EQ(a.load, b.load);
  ASSERT_EQ(a.grads.size(), b.grads.size());
  for (const auto& [name, g] : a.grads) {
    const Tensor& h = b.grads.at(name);
    ASSERT_EQ(g.nbytes(), h.nbytes()) << name;
    EXPECT_EQ(std::memcmp(g.raw(), h.raw(), g.nbytes()), 0) << name;
  }
}

TEST(ActivationCheckpointing, GradientsBitIdentical) {
  for (bool esft : {false, true}) {
    const RunResult plain = run(Device::CPU, false, esft), ckpt = run(Device::CPU, true, esft);
    EXPECT_EQ(plain.grads.size() == 6u, esft);
    EXPECT_FALSE(plain.grads.empty());
    expect_identical(plain, ckpt);
    expect_identical(plain, run(Device::CPU, false, esft, true));  // --recompute-experts
    expect_identical(plain, run(Device::CPU, true, esft, true));
  }
}

// The trainers take the loss gradient in place (dlogits sharing the logits' storage); it must
// equal the out-of-place result to the bit.
TEST(CrossEntropy, InPlaceGradientEqualsOutOfPlace) {
  std::mt19937 rng(4);
  std::normal_distribution<float> n(0.0f, 3.0f);
  const int64_t T = 7, V = 301;
  Tensor logits = Tensor::empty({T, V}), targets = Tensor::empty({T}, DType::I32);
  for (int64_t i = 0; i < logits.numel(); ++i) logits.f32()[i] = n(rng);
  for (int64_t t = 0; t < T; ++t) targets.i32()[t] = t == 3 ? -100 : int32_t(rng() % V);
  std::vector<Device> devices = {Device::CPU};
  if (backend_available(Device::CUDA)) devices.push_back(Device::CUDA);
  for (Device dev : devices) {
    const Tensor l = logits.to_device(dev).clone();
    Tensor d = Tensor::empty(l.shape(), DType::F32, dev), in_place = l.clone();
    const float a = cross_entropy(backend(dev), l, targets, &d);
    const float b = cross_entropy(backend(dev), in_place, targets, &in_place);
    EXPECT_EQ(a, b);
    const Tensor x = d.to_host(), y = in_place.to_host();
    EXPECT_EQ(std::memcmp(x.raw(), y.raw(), x.nbytes()), 0);
    EXPECT_NE(std::memcmp(y.raw(), logits.raw(), y.nbytes()), 0);
  }
}

// The memory check before a GPU run follows the options: checkpointing keeps one layer's
// activations (plus every layer's input), recomputing the experts keeps their rows of one layer,
// bf16 halves the frozen weights, and training's chunked LM head keeps at most 1024 rows of logits.
// Full DeepSeek-V2-Lite, ESFT with ~10% of the experts, batch 4 x 2048: measured 63.5 GiB of
// tensors on an H200 with bf16 + checkpointing.
TEST(MemoryEstimate, FollowsCheckpointingDtypeAndChunkedLoss) {
  const ModelConfig c =
      load_config(std::string(MOEKIT_SOURCE_DIR) + "/configs/deepseek-v2-lite.json");
  const int64_t tokens = 4 * 2048, trainable = 1574436864;
  const MemoryEstimate plain = estimate_memory(c, tokens, trainable);
  const MemoryEstimate bf16 = estimate_memory(c, tokens, trainable, DType::BF16);
  const MemoryEstimate both = estimate_memory(c, tokens, trainable, DType::BF16, true);
  EXPECT_LT(bf16.weights, 0.65 * plain.weights);  // 10 % at 6 bytes, 90 % at 2, against 4
  // bf16: every frozen value at 2 bytes, the embedding and the LM head included (1.68 GB of fp32
  // for V2-Lite), the trainable ones at 4 + 2.
  const double total = double(summarize(c).total);
  // A trainable weight: the fp32 master and its bf16 GEMM copy.
  EXPECT_DOUBLE_EQ(bf16.weights, 6.0 * double(trainable) + 2.0 * (total - double(trainable)));
  EXPECT_DOUBLE_EQ(estimate_memory(c, tokens, 0, DType::BF16).weights, 2.0 * total);
  EXPECT_EQ(bf16.activations, plain.activations);
  EXPECT_LT(both.activations, 0.15 * bf16.activations);
  const MemoryEstimate rx = estimate_memory(c, tokens, trainable, DType::BF16, false, true);
  EXPECT_LT(rx.activations, bf16.activations);
  EXPECT_GT(rx.activations, both.activations);
  const double gib = 1024.0 * 1024 * 1024;
  EXPECT_GT(both.total() / gib, 45.0);
  EXPECT_LT(both.total() / gib, 70.0);  // fits an 80 GB H100, as measured
  EXPECT_GT(plain.total() / gib, 80.0);
  // Inference keeps the whole logits: more than training's chunks.
  EXPECT_GT(estimate_memory(c, tokens, 0).activations, plain.activations);
}

// An inference forward (backward_follows = false) writes each layer's output over its input and
// adds each half into the residual stream in its last GEMM, as a training forward does into a
// copy: the logits must be the same bits (the same ops in the same order on the same values), on
// the grouped MoE path (64 tokens x top-k) and, with checkpointing on, keeping no layer input. A
// backward after it has nothing to read and must refuse with a clear error; so must logits in a
// dtype the backend cannot write.
void inference_forward_matches(Device dev, bool checkpointing) {
  DeepSeekModel m(tiny(), dev);
  m.init_random(3, 0.2f);
  m.set_activation_checkpointing(checkpointing);
  m.params().allocate_grads();
  const int64_t B = 2, S = 32;
  Tensor ids = Tensor::empty({B * S}, DType::I32);
  std::mt19937 rng(5);
  for (int64_t i = 0; i < B * S; ++i) ids.i32()[i] = int32_t(rng() % 300);
  const Tensor train = m.forward(ids, B, S).to_host();
  const Tensor infer = m.forward(ids, B, S, /*backward_follows=*/false).to_host();
  ASSERT_EQ(train.nbytes(), infer.nbytes());
  EXPECT_EQ(std::memcmp(train.raw(), infer.raw(), train.nbytes()), 0);
  bool any = false;
  for (int64_t i = 0; i < infer.numel(); ++i) any = any || infer.f32()[i] != 0.0f;
  EXPECT_TRUE(any) << "all-zero logits";
  Tensor d = Tensor::zeros(infer.shape(), DType::F32, dev);
  try {
    m.backward(d);
    ADD_FAILURE() << "backward after an inference forward ran";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no backward follows"), std::string::npos) << e.what();
  }
}

TEST(InferenceForward, SameLogitsAsTrainingForwardAndBackwardRefused) {
  for (bool ckpt : {false, true}) inference_forward_matches(Device::CPU, ckpt);
  DeepSeekModel m(tiny(), Device::CPU);
  Tensor ids = Tensor::zeros({4}, DType::I32);
  EXPECT_THROW(m.forward(ids, 1, 4, false, DType::BF16), Error);  // the CPU writes F32 only
}

TEST(GpuInferenceForward, SameLogitsAsTrainingForwardAndBackwardRefused) {
  if (!backend_available(Device::CUDA)) GTEST_SKIP() << "CUDA backend not available";
  for (bool ckpt : {false, true}) inference_forward_matches(Device::CUDA, ckpt);
}

TEST(GpuActivationCheckpointing, GradientsBitIdentical) {
  if (!backend_available(Device::CUDA)) GTEST_SKIP() << "CUDA backend not available";
  for (bool esft : {false, true})
    expect_identical(run(Device::CUDA, false, esft), run(Device::CUDA, true, esft));
}

}  // namespace
}  // namespace moekit
