// Routing dispersion: shares, experts covering 50% / 80% of the mass, and task overlap, on logs
// whose answers are known by hand.
#include <gtest/gtest.h>

#include "analysis/dispersion.h"

namespace moekit {
namespace {

// One sequence of tokens with K=2: expert a on every token, b on `nb` tokens, c on the rest.
SequenceRouting seq(int a, int b, int c, int tokens, int nb) {
  SequenceRouting s;
  for (int t = 0; t < tokens; ++t) {
    s.expert_ids.push_back(a);
    s.expert_ids.push_back(t < nb ? b : c);
    s.weights.push_back(0.6);
    s.weights.push_back(0.4);
  }
  return s;
}

TEST(Dispersion, SharesAndMassCoverage) {
  // Layer 1: expert 3 gets 10/20 selections, expert 0 gets 6, expert 5 gets 4.
  std::map<int, std::vector<SequenceRouting>> logs;
  logs[1] = {seq(3, 0, 5, 10, 6)};
  TaskDispersion d = routing_dispersion("t", logs, 8);
  ASSERT_EQ(d.layers.size(), 1u);
  EXPECT_DOUBLE_EQ(d.layers[0].share[3], 0.5);
  EXPECT_DOUBLE_EQ(d.layers[0].share[0], 0.3);
  EXPECT_DOUBLE_EQ(d.layers[0].share[5], 0.2);
  EXPECT_EQ(d.layers[0].experts_50, 1);  // expert 3 alone reaches 50%
  EXPECT_EQ(d.layers[0].experts_80, 2);  // + expert 0
  EXPECT_EQ(experts_covering(d.layers[0].share, 1.0), (std::vector<int>{3, 0, 5}));
}

TEST(Dispersion, TiesGoToTheLowerExpert) {
  EXPECT_EQ(experts_covering({0.25, 0.25, 0.25, 0.25}, 0.5), (std::vector<int>{0, 1}));
  EXPECT_EQ(experts_covering({0.1, 0.4, 0.1, 0.4}, 0.5), (std::vector<int>{1, 3}));
}

TEST(Dispersion, OverlapIsTheMeanJaccardOverLayers) {
  std::map<int, std::vector<SequenceRouting>> a, b;
  a[1] = {seq(0, 1, 2, 10, 10)};  // layer 1: experts 0 and 1 half each; 0 alone is 50%
  b[1] = {seq(0, 3, 4, 10, 10)};  // 0 alone too: Jaccard 1
  a[2] = {seq(5, 6, 7, 10, 10)};  // 5 alone
  b[2] = {seq(6, 7, 5, 10, 10)};  // 6 alone: Jaccard 0
  TaskDispersion da = routing_dispersion("a", a, 8), db = routing_dispersion("b", b, 8);
  EXPECT_DOUBLE_EQ(dispersion_overlap(da, db, 0.5), 0.5);
  EXPECT_DOUBLE_EQ(dispersion_overlap(da, da, 0.8), 1.0);
  // At 80%: layer 1 sets {0,1} vs {0,3} -> 1/3; layer 2 {5,6} vs {6,7} -> 1/3.
  EXPECT_NEAR(dispersion_overlap(da, db, 0.8), 1.0 / 3.0, 1e-12);
}

TEST(Dispersion, ExpertOutsideTheModelIsAnError) {
  std::map<int, std::vector<SequenceRouting>> logs;
  logs[1] = {seq(0, 9, 1, 2, 1)};
  EXPECT_THROW(routing_dispersion("t", logs, 8), std::exception);
}

}  // namespace
}  // namespace moekit
