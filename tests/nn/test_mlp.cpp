// MLP::forward_add (inference: y += down(silu(gate x) * up x), the down projection accumulating
// into y) against forward then add, on the CPU. The GPU side is in tests/model/test_gpu_model.cpp
// (GpuMoE.ForwardAddEqualsForwardPlusAdd).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "../tensor_testing.h"
#include "nn/mlp.h"

namespace moekit {
namespace {

using test::randn;

// Odd sizes (H 37, I 23), one token and five. The matmul with beta = 1 adds each product sum to y
// in its own order (y may enter the sum first rather than last), so the two sides may differ by
// fp32 rounding: ~1e-7 of the largest value for 23-term sums; 1e-6 normwise leaves a margin while
// a missing term or a dropped y is O(1).
TEST(MLP, ForwardAddEqualsForwardPlusAdd) {
  Backend& be = backend(Device::CPU);
  std::mt19937_64 rng(41);
  const int64_t H = 37, I = 23;
  ParamTable params;
  MLP mlp = MLP::create(params, "mlp", H, I, Device::CPU);
  for (const auto& p : params.all()) p->value.copy_from(randn(p->value.shape(), rng, 0.3f));
  for (int64_t T : {1, 5}) {
    SCOPED_TRACE(testing::Message() << "T " << T);
    const Tensor x = randn({T, H}, rng), y0 = randn({T, H}, rng);
    Tensor ref = y0.clone();
    be.add(ref, mlp.forward(be, x), 1.0f);
    Tensor y = y0.clone();
    mlp.forward_add(be, x, y);
    double d = 0.0, m = 0.0;
    for (int64_t i = 0; i < ref.numel(); ++i) {
      d = std::max(d, double(std::abs(y.f32()[i] - ref.f32()[i])));
      m = std::max(m, double(std::abs(ref.f32()[i])));
    }
    EXPECT_LE(d / m, 1e-6);
  }
}

}  // namespace
}  // namespace moekit
