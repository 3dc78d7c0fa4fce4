// The model's backward runs only what a trained parameter's gradient needs (DeepSeekModel::
// backward_from_hidden, DecoderLayer::backward, the MoE's trainable-experts-only backward): it
// stops at the lowest layer that trains, which computes no input gradient. Each case below trains a
// set of parameters and compares their gradients with those of the same set plus the token
// embedding, which forces every layer's full backward: the same ops on the same values, so on the
// CPU the gradients must agree to the bit. On the GPU too when one is visible, within a tolerance:
// cuBLAS may pick another kernel for a grouped GEMM over fewer experts.
#include <gtest/gtest.h>

#include <functional>
#include <map>
#include <random>
#include <string>

#include "../tensor_testing.h"
#include "model/checkpoint.h"
#include "model/deepseek.h"

namespace moekit {
namespace {

using Pred = std::function<bool(const std::string&)>;

// tiny.json with a third layer: layer 0 dense, layers 1 and 2 MoE (8 experts, top-2, 1 shared).
ModelConfig three_layers() {
  ModelConfig c = load_config(std::string(MOEKIT_SOURCE_DIR) + "/tests/fixtures/train/tiny.json");
  c.num_hidden_layers = 3;
  return c;
}

struct Step {
  std::map<std::string, Tensor> grads;
  bool layer0_saved = false;  // layer 0's attention still holds its forward's q after backward
};

Step run(Device dev, const Pred& trains, bool embedding_too) {
  DeepSeekModel m(three_layers(), dev);
  m.init_random(5, 0.2f);
  m.params().set_trainable([&](const Param& p) {
    return trains(p.name) || (embedding_too && p.name == "model.embed_tokens.weight");
  });
  m.params().allocate_grads();
  m.params().zero_grads();
  const int64_t B = 2, S = 24;
  Tensor ids = Tensor::empty({B * S}, DType::I32);
  std::mt19937 rng(17);
  for (int64_t i = 0; i < B * S; ++i) ids.i32()[i] = int32_t(rng() % 300);
  (void)m.loss_and_backward(ids, shifted_targets(ids, B, S), B, S, 1.0f, 16);
  Step r;
  r.layer0_saved = m.layers()[0].self_attn.saved.q.defined();
  for (const auto& p : m.params().all())
    if (p->grad.defined() && trains(p->name)) r.grads[p->name] = p->grad.to_host();
  return r;
}

bool has(const std::string& name, const char* s) {
  return name.find(s) != std::string::npos;
}

struct Case {
  const char* what;
  Pred trains;
  bool layer0_skipped;  // nothing in layer 0 or below trains
};

std::vector<Case> cases() {
  auto experts = [](const std::string& n) {  // ESFT: two experts of layer 1, one of layer 2
    return has(n, "layers.1.mlp.experts.0.") || has(n, "layers.1.mlp.experts.3.") ||
           has(n, "layers.2.mlp.experts.5.");
  };
  return {
      {"ESFT experts", experts, true},
      {"experts of the top layer only",
       [](const std::string& n) {
         return has(n, "layers.2.mlp.experts.1.") || has(n, "layers.2.mlp.experts.6.down_proj");
       },
       true},
      {"ESFT + the lowest layer's o_proj",
       [=](const std::string& n) { return experts(n) || has(n, "layers.1.self_attn.o_proj"); },
       true},
      {"ESFT + the lowest layer's kv_a projection and norm",
       [=](const std::string& n) {
         return experts(n) || has(n, "layers.1.self_attn.kv_a_proj") ||
                has(n, "layers.1.self_attn.kv_a_layernorm");
       },
       true},
      {"ESFT + the lowest layer's router",
       [=](const std::string& n) { return experts(n) || has(n, "layers.1.mlp.gate.weight"); },
       true},
      {"the lowest layer's shared experts' down projection",
       [](const std::string& n) { return has(n, "layers.1.mlp.shared_experts.down_proj"); }, true},
      {"the lowest layer's input norm",
       [](const std::string& n) { return has(n, "layers.1.input_layernorm"); }, true},
      {"the dense layer's up projection and ESFT experts",
       [=](const std::string& n) { return experts(n) || has(n, "layers.0.mlp.up_proj"); }, false},
      {"the final norm", [](const std::string& n) { return n == "model.norm.weight"; }, true},
      {"the LM head", [](const std::string& n) { return n == "lm_head.weight"; }, true},
  };
}

void check(Device dev) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.what);
    const Step pruned = run(dev, c.trains, false), full = run(dev, c.trains, true);
    ASSERT_FALSE(pruned.grads.empty());
    ASSERT_EQ(pruned.grads.size(), full.grads.size());
    // Layers below the lowest that trains drop what their forward saved, unused.
    EXPECT_EQ(pruned.layer0_saved, !c.layer0_skipped);
    EXPECT_TRUE(full.layer0_saved);
    for (const auto& [name, g] : pruned.grads) {
      const Tensor& f = full.grads.at(name);
      ASSERT_EQ(g.nbytes(), f.nbytes()) << name;
      double norm = 0.0;
      for (int64_t i = 0; i < g.numel(); ++i) norm += double(g.f32()[i]) * g.f32()[i];
      EXPECT_GT(norm, 0.0) << name << ": no gradient reached it";
      if (dev == Device::CPU)
        EXPECT_TRUE(test::bit_equal(g, f)) << name;
      else  // fp32 GPU GEMMs over other groupings: rounding-level differences at most
        EXPECT_LT(test::rel_diff(g, f), 1e-5) << name;
    }
  }
}

TEST(BackwardPruning, GradientsEqualTheFullBackward) {
  check(Device::CPU);
}

TEST(GpuBackwardPruning, GradientsEqualTheFullBackward) {
  if (!backend_available(Device::CUDA)) GTEST_SKIP() << "no GPU";
  check(Device::CUDA);
}

}  // namespace
}  // namespace moekit
