// MoE::forward's two routes on the CPU: the few-token path (moe_experts_small, taken when no
// backward follows and T*K <= MoE::kSmallMaxPairs) against the grouped path (plan, grouped GEMMs,
// combine) on the same layer and input; the route choice itself (pair limit, expert_load, backward
// refused after an inference forward); forward_add (y += MoE(x)) on both routes. The GPU side of
// the same comparisons is in tests/model/test_gpu_model.cpp (GpuMoE).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "../tensor_testing.h"
#include "core/error.h"
#include "nn/moe.h"

namespace moekit {
namespace {

using test::randn;

ModelConfig moe_config(bool shared) {
  ModelConfig c;
  c.hidden_size = 37;
  c.moe_intermediate_size = 23;
  c.n_routed_experts = 11;
  c.num_experts_per_tok = 6;
  c.n_shared_experts = shared ? 1 : 0;
  return c;
}

void randomize(ParamTable& params, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0.0f, 0.3f);
  for (const auto& p : params.all())
    for (int64_t i = 0; i < p->value.numel(); ++i) p->value.f32()[i] = n(rng);
}

// max |a - b| / max |b|.
double rel_diff(const Tensor& a, const Tensor& b) {
  double d = 0.0, m = 0.0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    d = std::max(d, double(std::abs(a.f32()[i] - b.f32()[i])));
    m = std::max(m, double(std::abs(b.f32()[i])));
  }
  return m > 0.0 ? d / m : d;
}

// Same routing, same experts; only the summation order differs (per-pair dot products and a
// k-ordered combine against GEMMs and a slot-ordered scatter): fp32 rounding, ~1e-6 of the
// largest output, so 1e-5 normwise.
TEST(MoESmallPath, EqualsTheGroupedPath) {
  Backend& be = backend(Device::CPU);
  for (bool shared : {false, true})
    for (int64_t T : {1, 3, 10}) {  // 6, 18 and 60 pairs: all within the limit
      SCOPED_TRACE(testing::Message() << "T " << T << " shared " << shared);
      ParamTable params;
      const ModelConfig c = moe_config(shared);
      MoE moe = MoE::create(params, "mlp", c, Device::CPU);
      randomize(params, 3);
      const Tensor x = randn({T, c.hidden_size}, 4 + uint64_t(T));
      const Tensor grouped = moe.forward(be, x);
      const std::vector<int64_t> load = moe.expert_load;
      const Tensor idx_grouped = moe.gate.saved.routing.topk_idx.clone();
      int64_t pairs = 0;
      for (int64_t n : load) pairs += n;
      EXPECT_EQ(pairs, T * c.num_experts_per_tok);

      const Tensor small = moe.forward(be, x, /*backward_follows=*/false);
      EXPECT_TRUE(moe.expert_load.empty()) << "the grouped path ran";
      const Tensor& idx_small = moe.gate.saved.routing.topk_idx;  // route logging reads this
      ASSERT_EQ(idx_small.numel(), idx_grouped.numel());
      EXPECT_TRUE(
          std::equal(idx_small.i32(), idx_small.i32() + idx_small.numel(), idx_grouped.i32()));
      EXPECT_LE(rel_diff(small, grouped), 1e-5);

      // No backward after an inference forward: it saved nothing.
      Tensor dx = Tensor::zeros(x.shape());
      EXPECT_THROW(moe.backward(be, dx, randn(x.shape(), 9), false), Error);
    }
}

// Past the few-token limit an inference forward takes the grouped path (its expert loads are
// recorded, which only that path computes) and still keeps nothing for a backward (the gate and
// up products are not even written where a backend fuses SwiGLU), so a backward is refused with
// a clear error; a training forward of the same tokens backs up.
TEST(MoESmallPath, ManyPairsTakeTheGroupedPath) {
  Backend& be = backend(Device::CPU);
  ParamTable params;
  const ModelConfig c = moe_config(true);
  MoE moe = MoE::create(params, "mlp", c, Device::CPU);
  randomize(params, 5);
  const int64_t T = MoE::kSmallMaxPairs / c.num_experts_per_tok + 1;  // just over the limit
  const Tensor x = randn({T, c.hidden_size}, 6);
  moe.forward(be, x, /*backward_follows=*/false);
  EXPECT_EQ(int64_t(moe.expert_load.size()), c.n_routed_experts);
  Tensor dx = Tensor::zeros(x.shape());
  EXPECT_THROW(moe.backward(be, dx, randn(x.shape(), 7), false), Error);
  moe.forward(be, x);
  EXPECT_NO_THROW(moe.backward(be, dx, randn(x.shape(), 7), false));
}

// forward_add against forward then add, on the few-token path (T = 1, 3, 10: the experts add into
// y, the shared experts folded in) and past it (T = 11: 66 pairs, the grouped path). On the few-
// token path bit-identical: both sides form the same sums in the same order and then add them to
// y once (the CPU's add computes y + 1 * out, and 1 * out is exact). On the grouped path the
// shared experts' down GEMM adds into y itself (beta 1) and the combine adds the routed experts
// after, so y + (shared + routed) becomes (y + shared) + routed: equal up to fp32 rounding of the
// sums' order (a few ulps of the largest term; 1e-5 relative bounds it with room). Neither route
// leaves anything for a backward.
TEST(MoESmallPath, ForwardAddEqualsForwardPlusAdd) {
  Backend& be = backend(Device::CPU);
  for (bool shared : {false, true})
    for (int64_t T : {1, 3, 10, 11}) {
      SCOPED_TRACE(testing::Message() << "T " << T << " shared " << shared);
      ParamTable params;
      const ModelConfig c = moe_config(shared);
      MoE moe = MoE::create(params, "mlp", c, Device::CPU);
      randomize(params, 8);
      const Tensor x = randn({T, c.hidden_size}, 10 + uint64_t(T));
      const Tensor y0 = randn({T, c.hidden_size}, 30 + uint64_t(T));
      Tensor ref = y0.clone();
      be.add(ref, moe.forward(be, x, /*backward_follows=*/false), 1.0f);
      Tensor y = y0.clone();
      moe.forward_add(be, x, y);
      const bool small = T * c.num_experts_per_tok <= MoE::kSmallMaxPairs;
      EXPECT_EQ(moe.expert_load.empty(), small) << "took the wrong route";
      if (small) {
        EXPECT_EQ(std::memcmp(y.raw(), ref.raw(), y.nbytes()), 0) << "differs from forward + add";
      } else {
        float worst = 0.0f;
        for (int64_t i = 0; i < y.numel(); ++i)
          worst = std::max(worst,
                           std::abs(y.f32()[i] - ref.f32()[i]) / (1.0f + std::abs(ref.f32()[i])));
        EXPECT_LT(worst, 1e-5f) << "differs from forward + add";
        EXPECT_NE(std::memcmp(y.raw(), y0.raw(), y.nbytes()), 0) << "nothing was added";
      }
      Tensor dx = Tensor::zeros(x.shape());
      EXPECT_THROW(moe.backward(be, dx, randn(x.shape(), 9), false), Error);
    }
  ParamTable params;
  MoE moe = MoE::create(params, "mlp", moe_config(true), Device::CPU);
  Tensor x = Tensor::zeros({2, 37}), wrong = Tensor::zeros({2, 36});
  EXPECT_THROW(moe.forward_add(be, x, wrong), Error);
}

}  // namespace
}  // namespace moekit
