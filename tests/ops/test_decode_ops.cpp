// The CPU backend's decode ops against scalar references written here: the strided batched GEMM
// (MLA's per-head products over head blocks of wider tensors) and the causal row softmax. The
// CPU backend is the oracle of the CUDA tests, so it is checked against plain loops first.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "core/error.h"
#include "ops/ops.h"

namespace moekit {
namespace {

Tensor randn(Shape s, std::mt19937_64& rng) {
  Tensor t = Tensor::empty(s);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(rng);
  return t;
}

// C_g[i, j] = alpha * sum_k A_g[i, k] B_g[k, j] + beta * C_g[i, j], blocks as GemmBatch says.
void reference_batched(Tensor& c, const Tensor& a, const Tensor& b, bool ta, bool tb, float alpha,
                       float beta, const GemmBatch& g) {
  for (int64_t p = 0; p < g.count; ++p)
    for (int64_t i = 0; i < g.m; ++i)
      for (int64_t j = 0; j < g.n; ++j) {
        double s = 0.0;
        for (int64_t k = 0; k < g.k; ++k) {
          const float x = a.f32()[p * g.stride_a + (ta ? k * g.lda + i : i * g.lda + k)];
          const float y = b.f32()[p * g.stride_b + (tb ? j * g.ldb + k : k * g.ldb + j)];
          s += double(x) * double(y);
        }
        float& out = c.f32()[p * g.stride_c + i * g.ldc + j];
        out = float(alpha * s + (beta == 0.0f ? 0.0 : double(beta) * out));
      }
}

TEST(DecodeOps, MatmulBatchedMatchesLoops) {
  std::mt19937_64 rng(3);
  Backend& cpu = backend(Device::CPU);
  // MLA's shapes: q [n, H, dn + dr] @ per-head [dn, r] blocks of W_kv_b -> [n, H, r], then the
  // value side with W_vb transposed. Odd sizes; every transpose combination.
  const int64_t n = 3, H = 4, dn = 5, dr = 2, dv = 6, r = 7;
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      SCOPED_TRACE(testing::Message() << "trans_a " << ta << " trans_b " << tb);
      GemmBatch g;
      g.count = H;
      g.m = n;
      g.n = r;
      g.k = dn;
      g.lda = ta ? H * n : H * (dn + dr);  // A stored [k, m] when transposed
      g.ldb = tb ? dn + dv : r;            // B stored [n, k] when transposed
      g.ldc = H * r;
      g.stride_a = ta ? n : dn + dr;
      g.stride_b = tb ? r * (dn + dv) : (dn + dv) * r;
      g.stride_c = r;
      Tensor a = randn({ta ? dn : n, ta ? H * n : H * (dn + dr)}, rng);
      Tensor b = randn({H * (tb ? r : dn + dv), tb ? dn + dv : r}, rng);
      Tensor c = randn({n, H * r}, rng), ref = c.clone();
      cpu.matmul_batched(c, a, b, ta, tb, 0.5f, 0.25f, g);
      reference_batched(ref, a, b, ta, tb, 0.5f, 0.25f, g);
      for (int64_t i = 0; i < c.numel(); ++i) EXPECT_NEAR(c.f32()[i], ref.f32()[i], 1e-5) << i;
    }
}

TEST(DecodeOps, MatmulBatchedRejectsBlocksOutsideTheTensor) {
  std::mt19937_64 rng(4);
  Tensor a = randn({2, 8}, rng), b = randn({4, 4}, rng), c = randn({2, 8}, rng);
  GemmBatch g;
  g.count = 2;
  g.m = 2;
  g.n = 4;
  g.k = 4;
  g.lda = 8;
  g.ldb = 4;
  g.ldc = 8;
  g.stride_a = 4;
  g.stride_b = 0;
  g.stride_c = 4;
  backend(Device::CPU).matmul_batched(c, a, b, false, false, 1.0f, 0.0f, g);  // fits exactly
  g.stride_c = 5;
  EXPECT_THROW(backend(Device::CPU).matmul_batched(c, a, b, false, false, 1.0f, 0.0f, g), Error);
}

TEST(DecodeOps, CausalSoftmaxRowLimits) {
  std::mt19937_64 rng(5);
  const int64_t tokens = 3, heads = 4, cached = 5, L = cached + tokens;
  Tensor x = randn({tokens * heads, L}, rng), ref = x.clone();
  backend(Device::CPU).causal_softmax(x, heads, cached + 1);
  for (int64_t row = 0; row < tokens * heads; ++row) {
    const int64_t visible = cached + 1 + row / heads;  // token i sees cache and itself
    const float* in = ref.f32() + row * L;
    double m = -INFINITY, z = 0.0;
    for (int64_t j = 0; j < visible; ++j) m = std::max(m, double(in[j]));
    for (int64_t j = 0; j < visible; ++j) z += std::exp(double(in[j]) - m);
    for (int64_t j = 0; j < L; ++j) {
      const double want = j < visible ? std::exp(double(in[j]) - m) / z : 0.0;
      EXPECT_NEAR(x.f32()[row * L + j], want, 1e-6) << "row " << row << " col " << j;
    }
  }
  // A limit past the row clamps to the row (every entry visible).
  Tensor y = randn({2, 3}, rng);
  backend(Device::CPU).causal_softmax(y, 1, 10);
  for (int64_t row = 0; row < 2; ++row) {
    double s = 0.0;
    for (int64_t j = 0; j < 3; ++j) s += y.f32()[row * 3 + j];
    EXPECT_NEAR(s, 1.0, 1e-6);
  }
}

TEST(DecodeOps, ArgmaxTakesTheFirstMaximumOfThePrefix) {
  Tensor x = Tensor::empty({3, 5});
  const float v[] = {1,  3,  3,     0, 2,   //
                     -5, -4, -4.5f, 9, -1,  //
                     0,  0,  0,     0, 0};
  std::copy(v, v + 15, x.f32());
  Tensor idx = Tensor::empty({3}, DType::I32);
  backend(Device::CPU).argmax(idx, x, 5);
  EXPECT_EQ(idx.i32()[0], 1);  // ties: the first
  EXPECT_EQ(idx.i32()[1], 3);
  EXPECT_EQ(idx.i32()[2], 0);
  backend(Device::CPU).argmax(idx, x, 3);  // only the first 3 columns count
  EXPECT_EQ(idx.i32()[1], 1);
}

}  // namespace
}  // namespace moekit
