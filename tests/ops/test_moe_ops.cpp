// The MoE ops of the CPU backend (the oracle the CUDA backend is checked against) against
// references written here: the permute plan against a stable sort of the (token, k) pairs by
// expert, the grouped GEMM against one plain matmul per expert on its row block.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "core/error.h"
#include "ops/ops.h"

namespace moekit {
namespace {

Backend& cpu() {
  return backend(Device::CPU);
}

Tensor randn(Shape s, std::mt19937_64& rng) {
  Tensor t = Tensor::empty(s);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(rng);
  return t;
}

bool bit_equal(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

struct Plan {
  Tensor slot_token, slot_pair, slot_weight, expert_begin;
};

Plan run_plan(const Tensor& idx, const Tensor& w, int64_t E) {
  const int64_t N = idx.numel();
  Plan p{Tensor::empty({N}, DType::I32), Tensor::empty({N}, DType::I32), Tensor::empty({N}),
         Tensor::empty({E + 1}, DType::I32)};
  std::fill_n(p.slot_token.i32(), N, -1);  // poison: an unwritten slot shows
  std::fill_n(p.slot_pair.i32(), N, -1);
  cpu().moe_dispatch_plan(p.slot_token, p.slot_pair, p.slot_weight, p.expert_begin, idx, w, E);
  return p;
}

// The plan from its definition: pairs stably sorted by expert.
void expect_plan(const Plan& p, const Tensor& idx, const Tensor& w, int64_t E) {
  const int64_t N = idx.numel(), K = idx.dim(1);
  std::vector<int32_t> order(static_cast<size_t>(N));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return idx.i32()[a] < idx.i32()[b]; });
  for (int64_t s = 0; s < N; ++s) {
    const int32_t pair = order[size_t(s)];
    ASSERT_EQ(p.slot_pair.i32()[s], pair) << "slot " << s;
    ASSERT_EQ(p.slot_token.i32()[s], pair / K) << "slot " << s;
    ASSERT_EQ(p.slot_weight.f32()[s], w.f32()[pair]) << "slot " << s;
  }
  for (int64_t e = 0; e <= E; ++e) {
    const auto below = std::count_if(idx.i32(), idx.i32() + N, [&](int32_t x) { return x < e; });
    EXPECT_EQ(p.expert_begin.i32()[e], below) << "expert " << e;
  }
}

TEST(MoeOps, DispatchPlanIsAStableSortByExpert) {
  std::mt19937_64 rng(7);
  // Every expert used; many empty experts (only every third drawn); a single expert; one token.
  struct Case {
    int64_t T, K, E, stride;
  };
  for (const Case& c :
       {Case{53, 4, 9, 1}, Case{101, 6, 31, 3}, Case{17, 1, 1, 1}, Case{1, 3, 5, 1}}) {
    Tensor idx = Tensor::empty({c.T, c.K}, DType::I32), w = randn({c.T, c.K}, rng);
    std::uniform_int_distribution<int32_t> u(0, int32_t((c.E - 1) / c.stride));
    for (int64_t i = 0; i < idx.numel(); ++i) idx.i32()[i] = u(rng) * int32_t(c.stride);
    expect_plan(run_plan(idx, w, c.E), idx, w, c.E);
  }
}

TEST(MoeOps, DispatchPlanRejectsAnOutOfRangeExpert) {
  Tensor idx = Tensor::zeros({3, 2}, DType::I32), w = Tensor::zeros({3, 2});
  idx.i32()[4] = 5;
  EXPECT_THROW(run_plan(idx, w, 5), Error);
}

// Row offsets of `sizes` groups.
std::vector<int64_t> offsets(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> begin{0};
  for (int64_t n : sizes) begin.push_back(begin.back() + n);
  return begin;
}

TEST(MoeOps, GroupedMatmulEqualsOneMatmulPerGroup) {
  std::mt19937_64 rng(11);
  const int64_t K = 13, N = 9;
  const std::vector<int64_t> sizes{5, 0, 1, 12, 0, 3};  // empty groups in the middle
  const std::vector<int64_t> begin = offsets(sizes);
  const int64_t R = begin.back(), G = int64_t(sizes.size());
  Tensor a = randn({R, K}, rng);
  for (bool trans_b : {false, true})
    for (float beta : {0.0f, 1.0f, 0.5f}) {
      std::vector<Tensor> w;
      std::vector<const Tensor*> wp;
      for (int64_t g = 0; g < G; ++g) w.push_back(randn(trans_b ? Shape{N, K} : Shape{K, N}, rng));
      for (const Tensor& t : w) wp.push_back(&t);
      wp[1] = nullptr;  // an empty group needs no weight
      Tensor c0 = randn({R, N}, rng), c = c0.clone(), ref = c0.clone();
      cpu().grouped_matmul(c, a, wp, begin, trans_b, beta);
      for (int64_t g = 0; g < G; ++g) {
        if (sizes[size_t(g)] == 0) continue;
        Tensor rg = ref.slice(begin[size_t(g)], begin[size_t(g) + 1]);
        cpu().matmul(rg, a.slice(begin[size_t(g)], begin[size_t(g) + 1]), w[size_t(g)], false,
                     trans_b, 1.0f, beta);
      }
      EXPECT_TRUE(bit_equal(c, ref)) << "trans_b " << trans_b << " beta " << beta;
      // And against a scalar loop, so the reference is not only the same calls.
      for (int64_t g = 0; g < G; ++g)
        for (int64_t r = begin[size_t(g)]; r < begin[size_t(g) + 1]; ++r)
          for (int64_t j = 0; j < N; ++j) {
            double s = beta * double(c0.f32()[r * N + j]);
            for (int64_t k = 0; k < K; ++k)
              s += double(a.f32()[r * K + k]) *
                   double(trans_b ? w[size_t(g)].f32()[j * K + k] : w[size_t(g)].f32()[k * N + j]);
            ASSERT_NEAR(c.f32()[r * N + j], s, 1e-4) << "group " << g << " row " << r;
          }
    }
}

TEST(MoeOps, GroupedMatmulChecksShapes) {
  Tensor a = Tensor::zeros({4, 3}), c = Tensor::zeros({4, 2}), w = Tensor::zeros({2, 3});
  const Tensor* wp[] = {&w, &w};
  const std::vector<int64_t> ok{0, 1, 4}, short_rows{0, 1, 3}, decreasing{0, 3, 2};
  EXPECT_NO_THROW(cpu().grouped_matmul(c, a, wp, ok, true, 0.0f));
  EXPECT_THROW(cpu().grouped_matmul(c, a, wp, ok, false, 0.0f), Error);  // w is [N, K]
  EXPECT_THROW(cpu().grouped_matmul(c, a, wp, short_rows, true, 0.0f), Error);
  EXPECT_THROW(cpu().grouped_matmul(c, a, wp, decreasing, true, 0.0f), Error);
  const Tensor* missing[] = {&w, nullptr};
  EXPECT_THROW(cpu().grouped_matmul(c, a, missing, ok, true, 0.0f), Error);
}

}  // namespace
}  // namespace moekit
