// RMSNorm's op contract on the CPU backend (the reference for the GPU's): the backward's
// accumulate mode adds exactly the plain mode's dx to what dx held (the op's own add replaces the
// temporary and the add pass RMSNorm::backward used to run), the layer's backward does the same,
// and the bf16 outputs that only the CUDA backend has (the norm's, and attention's out, which the
// same change gave the GPU) are refused by name.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>

#include "../tensor_testing.h"
#include "core/error.h"
#include "nn/rmsnorm.h"
#include "ops/ops.h"

namespace moekit {
namespace {

using test::bit_equal;
using test::randn;

// dx += norm'(dy) equals, bit for bit, the old value plus the plain op's dx (one fp32 add per
// element, as the add pass did), and dw accumulates the same in both modes. Rows of 1, 33 and 300
// columns (the loops' edges) with a weight that is not all ones.
TEST(CpuRmsNorm, BackwardAccumulateAddsThePlainGradient) {
  Backend& be = backend(Device::CPU);
  std::mt19937_64 rng(5);
  for (auto [T, C] : {std::pair<int64_t, int64_t>{7, 300}, {1, 33}, {19, 1}}) {
    SCOPED_TRACE(testing::Message() << "T " << T << " C " << C);
    const Tensor x = randn({T, C}, rng), g = randn({T, C}, rng), old = randn({T, C}, rng);
    Tensor w = randn({C}, rng, 0.3f);
    for (int64_t i = 0; i < C; ++i) w.f32()[i] += 1.0f;
    Tensor y = Tensor::empty({T, C}), rstd = Tensor::empty({T});
    be.rmsnorm_forward(y, rstd, x, w, 1e-6f);

    Tensor plain = Tensor::empty({T, C}), dw_plain = Tensor::zeros({C});
    be.rmsnorm_backward(plain, nullptr, &dw_plain, g, x, w, rstd, false);
    Tensor acc = old.clone(), dw_acc = Tensor::zeros({C});
    be.rmsnorm_backward(acc, nullptr, &dw_acc, g, x, w, rstd, true);

    Tensor want = old.clone();
    be.add(want, plain, 1.0f);
    EXPECT_TRUE(bit_equal(acc, want)) << "dx += differs from old + dx";
    EXPECT_TRUE(bit_equal(dw_acc, dw_plain)) << "dw";
    // Not vacuous: the gradient is not zero, so the old value alone would fail.
    double moved = 0.0;
    for (int64_t i = 0; i < acc.numel(); ++i) moved += std::abs(acc.f32()[i] - old.f32()[i]);
    EXPECT_GT(moved, 0.0);
    // A frozen weight (dw null) gives the same dx.
    Tensor acc2 = old.clone();
    be.rmsnorm_backward(acc2, nullptr, nullptr, g, x, w, rstd, true);
    EXPECT_TRUE(bit_equal(acc2, acc));
  }
}

// The layer: backward with accumulate adds into dx (no temporary), equal to old + the plain
// backward; the weight gradient is the same in both modes. forward's default output is F32.
TEST(CpuRmsNorm, LayerBackwardAccumulates) {
  Backend& be = backend(Device::CPU);
  std::mt19937_64 rng(6);
  ParamTable params;
  RMSNorm norm;
  norm.weight = params.add("w", {24}, Device::CPU);
  Tensor wv = randn({24}, rng, 0.2f);
  for (int64_t i = 0; i < 24; ++i) wv.f32()[i] += 1.0f;
  norm.weight->value.copy_from(wv);
  params.allocate_grads();
  params.zero_grads();
  const Tensor x = randn({9, 24}, rng), dy = randn({9, 24}, rng), old = randn({9, 24}, rng);
  const Tensor y = norm.forward(be, x);
  EXPECT_EQ(y.dtype(), DType::F32);

  Tensor plain = Tensor::empty({9, 24});
  norm.backward(be, plain, dy, false);
  const Tensor dw_plain = norm.weight->grad.clone();
  params.zero_grads();
  Tensor acc = old.clone();
  norm.backward(be, acc, dy, true);
  Tensor want = old.clone();
  be.add(want, plain, 1.0f);
  EXPECT_TRUE(bit_equal(acc, want));
  EXPECT_TRUE(bit_equal(norm.weight->grad, dw_plain)) << "dw";
}

// The CPU computes in fp32 only: supports(RmsNorm, BF16) is false, and a BF16 output or a dx_bf16
// copy is refused with a message naming the op (never written as if it were fp32).
TEST(CpuRmsNorm, RefusesBf16Outputs) {
  Backend& be = backend(Device::CPU);
  EXPECT_FALSE(be.supports(Op::RmsNorm, DType::BF16));
  std::mt19937_64 rng(7);
  const Tensor x = randn({4, 8}, rng), w = randn({8}, rng), g = randn({4, 8}, rng);
  Tensor rstd = Tensor::empty({4});
  Tensor y16 = Tensor::empty({4, 8}, DType::BF16);
  try {
    be.rmsnorm_forward(y16, rstd, x, w, 1e-6f);
    ADD_FAILURE() << "a BF16 output was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("CPU rmsnorm_forward: BF16 operand"), std::string::npos)
        << e.what();
  }
  Tensor y = Tensor::empty({4, 8});
  be.rmsnorm_forward(y, rstd, x, w, 1e-6f);
  Tensor dx = Tensor::empty({4, 8}), dx16 = Tensor::empty({4, 8}, DType::BF16);
  try {
    be.rmsnorm_backward(dx, &dx16, nullptr, g, x, w, rstd, false);
    ADD_FAILURE() << "a dx_bf16 copy was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("CPU rmsnorm_backward: a dx_bf16 copy"), std::string::npos)
        << e.what();
  }
}

// Attention's BF16 out (MLA's o under Bf16 on the GPU): not on the CPU, refused by name in both
// passes.
TEST(CpuAttention, RefusesBf16Out) {
  Backend& be = backend(Device::CPU);
  std::mt19937_64 rng(8);
  const Tensor q = randn({6, 2, 4}, rng), v = randn({6, 2, 4}, rng);
  Tensor o16 = Tensor::empty({6, 2, 4}, DType::BF16), lse = Tensor::empty({1, 2, 6});
  try {
    be.attention_forward(o16, lse, q, q, v, 1, 6, 2, 0.5f);
    ADD_FAILURE() << "a BF16 out was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("CPU attention_forward: BF16 operand"), std::string::npos)
        << e.what();
  }
  Tensor out = Tensor::empty({6, 2, 4});
  be.attention_forward(out, lse, q, q, v, 1, 6, 2, 0.5f);
  Tensor dq = Tensor::empty({6, 2, 4}), dk = Tensor::empty({6, 2, 4}),
         dv = Tensor::empty({6, 2, 4});
  try {
    be.attention_backward(dq, dk, dv, v, out.to_dtype(DType::BF16), lse, q, q, v, 1, 6, 2, 0.5f);
    ADD_FAILURE() << "a BF16 out was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("CPU attention_backward: BF16 operand"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace moekit
