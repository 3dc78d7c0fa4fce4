// Backend::cross_entropy_fused on the CPU: the base class's default (the CPU backend does not
// override it), which must be exactly cross_entropy_forward then cross_entropy_backward, in a
// separate gradient tensor and in place, with ignored targets. The CPU is the reference the GPU's
// fused kernel is checked against (tests/ops/test_cuda_loss.cpp), so this is bit equality.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>

#include "../tensor_testing.h"
#include "ops/ops.h"

namespace moekit {
namespace {

using test::bit_equal;

TEST(CpuCrossEntropyFused, EqualsForwardThenBackward) {
  Backend& be = backend(Device::CPU);
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const int64_t T = 37, V = 1003;
  Tensor logits = Tensor::empty({T, V}), targets = Tensor::empty({T}, DType::I32);
  for (int64_t i = 0; i < logits.numel(); ++i) logits.f32()[i] = normal(rng);
  std::uniform_int_distribution<int32_t> token(0, int32_t(V) - 1);
  for (int64_t t = 0; t < T; ++t) targets.i32()[t] = t % 5 == 0 ? -100 : token(rng);
  targets.i32()[1] = 0;  // both ends of the vocabulary
  targets.i32()[2] = int32_t(V) - 1;
  const float scale = 1.0f / 29.0f;

  Tensor losses = Tensor::empty({T}), d = Tensor::empty({T, V});
  be.cross_entropy_forward(losses, logits, targets);
  be.cross_entropy_backward(d, logits, targets, scale);

  Tensor f_losses = Tensor::empty({T}), f_d = Tensor::empty({T, V});
  be.cross_entropy_fused(f_losses, f_d, logits, targets, scale);
  EXPECT_TRUE(bit_equal(f_losses, losses)) << "losses";
  EXPECT_TRUE(bit_equal(f_d, d)) << "dlogits";

  // In place (the LM head's training step under Fp32): the loss must come from the logits, not
  // from the gradient that overwrites them.
  Tensor in_place = logits.clone(), p_losses = Tensor::empty({T});
  be.cross_entropy_fused(p_losses, in_place, in_place, targets, scale);
  EXPECT_TRUE(bit_equal(p_losses, losses)) << "losses (in place)";
  EXPECT_TRUE(bit_equal(in_place, d)) << "dlogits (in place)";

  // Ignored rows: loss 0 and a zero gradient row.
  for (int64_t t = 0; t < T; t += 5) {
    EXPECT_EQ(f_losses.f32()[t], 0.0f) << "row " << t;
    for (int64_t i = 0; i < V; ++i) ASSERT_EQ(f_d.f32()[t * V + i], 0.0f) << "row " << t;
  }
}

}  // namespace
}  // namespace moekit
