// round_bf16 on the CPU backend (exact: the reference the GPU's op is checked against) and the
// layers' policy around it (nn/linear.h): on the CPU, whose precision is always Fp32, gemm_input
// and linear_backward must leave every tensor as it is, so the exact fp32 mode cannot change.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <string>

#include "core/dtype.h"
#include "core/error.h"
#include "nn/linear.h"
#include "ops/ops.h"

namespace moekit {
namespace {

uint16_t bits_at(const Tensor& t, int64_t i) {
  return static_cast<const uint16_t*>(t.raw())[i];
}

// Nearest bf16, ties to even, by hand on values whose answer is known: 1 + 2^-8 lies halfway
// between 1 (even mantissa) and 1 + 2^-7 (odd), so it rounds down; 1 + 3 * 2^-8 lies halfway
// between 1 + 2^-7 (odd) and 1 + 2^-6 (even), so it rounds up. Then random values against the
// library's f32_to_bf16 and Tensor::to_dtype.
TEST(CpuRoundBf16, NearestTiesToEven) {
  Backend& be = backend(Device::CPU);
  EXPECT_TRUE(be.supports(Op::RoundBf16, DType::BF16));
  EXPECT_FALSE(be.supports(Op::Matmul, DType::BF16));
  const float vals[] = {1.0f,
                        1.0f + std::ldexp(1.0f, -8),
                        1.0f + 3 * std::ldexp(1.0f, -8),
                        -1.0f - std::ldexp(1.0f, -8),
                        1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20),
                        -0.0f,
                        std::numeric_limits<float>::infinity()};
  const uint16_t want[] = {0x3F80, 0x3F80, 0x3F82, 0xBF80, 0x3F81, 0x8000, 0x7F80};
  Tensor x = Tensor::empty({int64_t(std::size(vals))});
  for (size_t i = 0; i < std::size(vals); ++i) x.f32()[i] = vals[i];
  Tensor out = Tensor::empty(x.shape(), DType::BF16);
  be.round_bf16(out, x);
  for (size_t i = 0; i < std::size(vals); ++i)
    EXPECT_EQ(bits_at(out, int64_t(i)), want[i]) << "value " << vals[i];

  std::mt19937_64 rng(7);
  std::normal_distribution<float> n(0.0f, 10.0f);
  Tensor r = Tensor::empty({1000, 37});  // several thread-pool chunks
  for (int64_t i = 0; i < r.numel(); ++i) r.f32()[i] = n(rng);
  Tensor ro = Tensor::empty(r.shape(), DType::BF16);
  be.round_bf16(ro, r);
  const Tensor lib = r.to_dtype(DType::BF16);
  int64_t bad = 0;
  for (int64_t i = 0; i < r.numel(); ++i)
    bad += bits_at(ro, i) != f32_to_bf16(r.f32()[i]) || bits_at(ro, i) != bits_at(lib, i);
  EXPECT_EQ(bad, 0);
}

TEST(CpuRoundBf16, RefusesWrongDtypesAndSizes) {
  Backend& be = backend(Device::CPU);
  const Tensor x = Tensor::zeros({4, 3});
  auto expect_error = [](const std::function<void()>& f, const char* what) {
    try {
      f();
      ADD_FAILURE() << "no error: " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("round_bf16"), std::string::npos) << e.what();
    }
  };
  Tensor f32_out = Tensor::empty({4, 3}), small = Tensor::empty({4, 2}, DType::BF16);
  Tensor bf16_in = Tensor::zeros({4, 3}, DType::BF16), out = Tensor::empty({4, 3}, DType::BF16);
  expect_error([&] { be.round_bf16(f32_out, x); }, "F32 out");
  expect_error([&] { be.round_bf16(small, x); }, "numel");
  expect_error([&] { be.round_bf16(out, bf16_in); }, "BF16 in");
}

// The CPU is always exact fp32: the layers' rounding policy is off, and gemm_input hands back the
// very tensor it was given (no copy, no rounding), whatever its rows.
TEST(CpuRoundBf16, LayersKeepFp32OnTheCpu) {
  Backend& be = backend(Device::CPU);
  be.set_precision(Precision::Bf16);  // ignored by the CPU
  EXPECT_EQ(be.precision(), Precision::Fp32);
  EXPECT_FALSE(bf16_gemm_inputs(be));
  EXPECT_EQ(be.unrounded_gemv_rows(), 0);
  for (int64_t rows : {1, 64}) {
    const Tensor x = Tensor::zeros({rows, 8});
    const Tensor in = gemm_input(be, x);
    EXPECT_EQ(in.dtype(), DType::F32);
    EXPECT_EQ(in.raw(), x.raw());
    EXPECT_EQ(bf16_operand(be, x).raw(), x.raw());
    EXPECT_EQ(gemm_input_dtype(be, rows), DType::F32);
  }
}

}  // namespace
}  // namespace moekit
