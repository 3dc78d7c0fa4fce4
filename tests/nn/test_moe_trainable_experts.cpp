// The MoE backward when only some routed experts train (ESFT) against the same layer with every
// parameter training. With a few trainable experts, backward compacts their slot rows (one gather
// per slot-order tensor, nn/moe.cpp's trainable_expert_grads) before their weight-gradient GEMMs;
// with all of them it reads the plan's layout as it is. Compaction only moves rows, and on the CPU
// each expert's GEMM then reads the same rows in the same order either way, so the trained
// experts' gradients, and dx, must be bit-identical to full training's.
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <random>
#include <string>

#include "../tensor_testing.h"
#include "nn/moe.h"

namespace moekit {
namespace {

using test::bit_equal;
using test::randn;

// 29 tokens over 11 experts, 6 each: every expert gets slots, so ESFT's layer has frozen experts
// with slots (compaction, not the whole layout).
constexpr int64_t kTokens = 29;

ModelConfig moe_config() {
  ModelConfig c;
  c.hidden_size = 37;
  c.moe_intermediate_size = 23;
  c.n_routed_experts = 11;
  c.num_experts_per_tok = 6;
  c.n_shared_experts = 1;
  return c;
}

// One layer (same values for every `trains`), one forward and backward on the same x and dy.
struct LayerStep {
  ParamTable params;
  MoE moe;
  Tensor dx;

  // input_grad false: backward gets an undefined dx (nothing below the layer trains).
  LayerStep(const std::function<bool(const Param&)>& trains, bool recompute,
            bool input_grad = true) {
    moe = MoE::create(params, "mlp", moe_config(), Device::CPU);
    moe.recompute_experts = recompute;
    std::mt19937_64 rng(41);
    std::normal_distribution<float> n(0.0f, 0.3f);
    for (const auto& p : params.all())
      if (!p->buffer)
        for (int64_t i = 0; i < p->value.numel(); ++i) p->value.f32()[i] = n(rng);
    params.set_trainable(trains);
    params.allocate_grads();
    params.zero_grads();
    Backend& be = backend(Device::CPU);
    const int64_t H = moe_config().hidden_size;
    const Tensor x = randn({kTokens, H}, 42), dy = randn({kTokens, H}, 43);
    (void)moe.forward(be, x);
    if (input_grad) dx = Tensor::empty(x.shape());
    moe.backward(be, dx, dy, /*accumulate=*/false);
  }
};

// Experts 1 and 9 train whole, 4 only its down projection, 6 only gate and up (each of
// trainable_expert_grads' two branches with and without a frozen neighbour); everything else,
// router and shared experts included, is frozen, as in ESFT.
bool esft_trains(const Param& p) {
  const std::string& n = p.name;
  auto in = [&](const char* s) { return n.find(s) != std::string::npos; };
  return in("experts.1.") || in("experts.9.") || in("experts.4.down_proj") ||
         (in("experts.6.") && !in("down_proj"));
}

TEST(MoETrainableExperts, GradientsAreBitIdenticalToFullTraining) {
  for (bool recompute : {false, true}) {
    SCOPED_TRACE(recompute ? "recompute_experts" : "saved gate/up");
    const LayerStep full([](const Param&) { return true; }, recompute);
    const LayerStep esft(esft_trains, recompute);
    for (int64_t load : esft.moe.expert_load) ASSERT_GT(load, 0) << "an expert without slots";
    int trained = 0;
    for (const auto& p : esft.params.all()) {
      if (!p->grad.defined()) continue;
      ++trained;
      EXPECT_TRUE(bit_equal(p->grad, full.params.at(p->name).grad)) << p->name;
    }
    EXPECT_EQ(trained, 3 + 3 + 1 + 2);
    EXPECT_TRUE(bit_equal(esft.dx, full.dx));
  }
}

// Without an input gradient and with the router frozen, backward runs the down projection's and
// SwiGLU's backward for the trainable experts' compacted slots only, and the shared experts' weight
// gradients alone: the same ops on the same rows, so the same bits. With the router training too,
// the full backward runs without its dx GEMMs: the router's gradient must not move either.
TEST(MoETrainableExperts, WithoutInputGradientTheGradientsAreBitIdentical) {
  using Trains = std::function<bool(const Param&)>;
  const Trains with_router = [](const Param& p) {
    return esft_trains(p) || p.name == "mlp.gate.weight" ||
           p.name.find("shared_experts.up_proj") != std::string::npos;
  };
  for (bool recompute : {false, true}) {
    for (const Trains& trains : {Trains(esft_trains), with_router}) {
      SCOPED_TRACE(recompute ? "recompute_experts" : "saved gate/up");
      const LayerStep full([](const Param&) { return true; }, recompute);
      const LayerStep pruned(trains, recompute, /*input_grad=*/false);
      EXPECT_FALSE(pruned.dx.defined());
      int trained = 0;
      for (const auto& p : pruned.params.all()) {
        if (!p->grad.defined()) continue;
        ++trained;
        EXPECT_TRUE(bit_equal(p->grad, full.params.at(p->name).grad)) << p->name;
      }
      EXPECT_GE(trained, 9);
    }
  }
}

}  // namespace
}  // namespace moekit
