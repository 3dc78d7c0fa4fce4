// The CPU backend's Backend::sample (sample_row, every backend's reference) against a brute-force
// rule written in the test (sample_reference.h: the row fully sorted, masses in double): a
// hand-made row whose choices are worked out below, then random rows with ties, -inf entries and a
// prefix of the row, over temperatures, top-k, top-p and draws.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "ops/ops.h"
#include "sample_reference.h"

namespace moekit {
namespace {

int32_t cpu_sample(const std::vector<float>& logits, int64_t n, const SampleParams& p, double u01) {
  Tensor x = Tensor::empty({1, int64_t(logits.size())});
  std::copy(logits.begin(), logits.end(), x.f32());
  Tensor id = Tensor::empty({1}, DType::I32);
  backend(Device::CPU).sample(id, x, n, p, u01);
  return id.i32()[0];
}

TEST(SampleOp, HandMadeRow) {
  // Weights at T = 1: e^-2, 1, 1, e^-3, e^-1 = 0.135, 1, 1, 0.050, 0.368 (z = 2.553); most likely
  // first: ids 1, 2 (tied: the lower id first), 4, 0, 3.
  const std::vector<float> x = {1, 3, 3, 0, 2};
  // top_k 2 keeps ids 1 and 2, half the mass each.
  EXPECT_EQ(cpu_sample(x, 5, {1.0f, 2, 1.0f}, 0.25), 1);
  EXPECT_EQ(cpu_sample(x, 5, {1.0f, 2, 1.0f}, 0.75), 2);
  for (double u : {0.0, 0.5, 0.999}) {
    EXPECT_EQ(cpu_sample(x, 5, {1.0f, 1, 1.0f}, u), 1);   // top_k 1: the first of the tie
    EXPECT_EQ(cpu_sample(x, 5, {0.3f, 0, 1e-6f}, u), 1);  // a tiny nucleus: the first alone
  }
  // top_p 0.5: 1 / z = 0.39 < 0.5 <= 2 / z = 0.78, so ids 1 and 2 again.
  EXPECT_EQ(cpu_sample(x, 5, {1.0f, 0, 0.5f}, 0.49), 1);
  EXPECT_EQ(cpu_sample(x, 5, {1.0f, 0, 0.5f}, 0.51), 2);
  // top_p 0.9: 2.368 / z = 0.93 keeps id 4 too; u = 0.95 * 2.368 = 2.25 lies past 2.
  EXPECT_EQ(cpu_sample(x, 5, {1.0f, 0, 0.9f}, 0.95), 4);
  // No cut: the walk goes in id order, so the smallest draws pick id 0 (0.135 / 2.553 = 0.053).
  EXPECT_EQ(cpu_sample(x, 5, {1.0f, 0, 1.0f}, 0.01), 0);
  EXPECT_EQ(cpu_sample(x, 5, {1.0f, 0, 1.0f}, 0.06), 1);
  EXPECT_EQ(cpu_sample(x, 5, {1.0f, 5, 1.0f}, 0.01), 0);  // top_k >= n cuts nothing
  // Only the first n logits count: among ids 0..2 the last draw picks id 2.
  EXPECT_EQ(cpu_sample(x, 3, {1.0f, 0, 1.0f}, 0.999), 2);
  EXPECT_EQ(cpu_sample(x, 1, {1.0f, 0, 0.5f}, 0.999), 0);
  // A high temperature flattens: at T = 100 id 0 holds ~1/5 of the mass, so u01 0.1 picks it.
  EXPECT_EQ(cpu_sample(x, 5, {100.0f, 0, 1.0f}, 0.1), 0);
}

TEST(SampleOp, MatchesBruteForce) {
  std::mt19937_64 rng(21);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  const int64_t V = 3000;
  // Three rows: continuous logits; logits on a 0.25 grid (many ties, at every cut); a few masked
  // (-inf) entries among continuous ones.
  std::vector<std::vector<float>> rows(3, std::vector<float>(size_t(V)));
  for (int64_t i = 0; i < V; ++i) {
    const float v = normal(rng);
    rows[0][size_t(i)] = v;
    rows[1][size_t(i)] = std::round(v * 4.0f) / 4.0f;
    rows[2][size_t(i)] = i % 7 == 3 ? -std::numeric_limits<float>::infinity() : v;
  }
  const SampleParams params[] = {{1.0f, 0, 1.0f},  {0.7f, 50, 1.0f},   {1.0f, 0, 0.9f},
                                 {1.3f, 40, 0.8f}, {1.0f, 1, 1.0f},    {2.0f, 0, 1e-5f},
                                 {0.5f, 0, 0.5f},  {1.0f, 2999, 1.0f}, {1.0f, 1000, 0.99f}};
  const double draws[] = {0.0, 1e-9, 0.1234, 0.5, 0.77, 0.999999};
  int exact = 0, cases = 0;
  for (size_t r = 0; r < rows.size(); ++r)
    for (int64_t n : {V, V - 123}) {
      const SampleReference ref(rows[r].data(), n);
      for (const SampleParams& p : params)
        for (double u : draws) {
          SCOPED_TRACE(testing::Message()
                       << "row " << r << " n " << n << " T " << p.temperature << " top_k "
                       << p.top_k << " top_p " << p.top_p << " u01 " << u);
          const std::set<int32_t> ok = ref.allowed(p, u, 1e-9);
          const int32_t id = cpu_sample(rows[r], n, p, u);
          EXPECT_TRUE(ok.count(id)) << "id " << id << ", expected " << *ok.begin();
          exact += ok.size() == 1;
          ++cases;
        }
    }
  // The slack above is for sums taken in another order; nearly every case has one answer.
  EXPECT_GE(exact, cases * 9 / 10);
}

TEST(SampleOp, ChecksItsArguments) {
  const std::vector<float> x = {0.0f, 1.0f, 2.0f};
  Tensor row = Tensor::empty({1, 3}), two_rows = Tensor::empty({2, 3});
  std::copy(x.begin(), x.end(), row.f32());
  Tensor id = Tensor::empty({1}, DType::I32);
  Backend& cpu = backend(Device::CPU);
  EXPECT_THROW(cpu.sample(id, row, 3, {0.0f, 0, 1.0f}, 0.5), Error);  // greedy is argmax
  EXPECT_THROW(cpu.sample(id, row, 4, {1.0f, 0, 1.0f}, 0.5), Error);
  EXPECT_THROW(cpu.sample(id, row, 0, {1.0f, 0, 1.0f}, 0.5), Error);
  EXPECT_THROW(cpu.sample(id, row, 3, {1.0f, -1, 1.0f}, 0.5), Error);
  EXPECT_THROW(cpu.sample(id, row, 3, {1.0f, 0, 1.0f}, 1.5), Error);
  EXPECT_THROW(cpu.sample(id, two_rows, 3, {1.0f, 0, 1.0f}, 0.5), Error);
  cpu.sample(id, row, 3, {1.0f, 0, 1.0f}, 0.999);
  EXPECT_EQ(id.i32()[0], 2);
}

}  // namespace
}  // namespace moekit
