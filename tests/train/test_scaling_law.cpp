// Scaling-law plan, FLOPs-per-token model scale, learning-rate schedules and `moekit plan`.
#include "train/scaling_law.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "../run_command.h"
#include "core/error.h"

namespace moekit {

namespace {
// Relative closeness: the fitted constants have 4 significant figures, the checks 3.
void expect_rel(double got, double want, double rel = 5e-3) {
  EXPECT_NEAR(got, want, std::abs(want) * rel) << "want " << want;
}
}  // namespace

TEST(ScalingLaw, PlanAt1e20MatchesHandComputedValues) {
  // C = 1e20, log10 C = 20:
  //   B   = 0.2920 * 10^(20*0.3271 = 6.542)   = 0.2920 * 3.483e6  = 1.02e6 tokens
  //   eta = 0.3118 * 10^(-20*0.125 = -2.5)    = 0.3118 * 3.162e-3 = 9.86e-4
  //   M   = 0.1715 * 10^(20*0.5243 = 10.486)  = 0.1715 * 3.062e10 = 5.25e9 FLOPs/token
  //   D   = 5.8316 * 10^(20*0.4757 = 9.514)   = 5.8316 * 3.266e9  = 1.90e10 tokens
  //   M * D / C = 0.1715 * 5.8316 = 1.0001 (the exponents sum to 1)
  const ScalingPlan p = plan_for_compute(1e20);
  expect_rel(p.batch_tokens, 1.02e6);
  expect_rel(p.learning_rate, 9.86e-4);
  expect_rel(p.model_flops_per_token, 5.25e9);
  expect_rel(p.tokens, 1.90e10);
  EXPECT_NEAR(p.allocation_check(), 1.0001, 1e-4);
  EXPECT_FALSE(p.model_fixed);
}

TEST(ScalingLaw, FixedModelDerivesTokensFromCompute) {
  const ScalingPlan p = plan_for_model(1e17, 2e8);
  EXPECT_DOUBLE_EQ(p.tokens, 5e8);
  EXPECT_DOUBLE_EQ(p.model_flops_per_token, 2e8);
  EXPECT_DOUBLE_EQ(p.allocation_check(), 1.0);
  EXPECT_TRUE(p.model_fixed);
  // B and eta still follow C: 0.2920 * 10^5.5607 = 1.06e5, 0.3118 * 10^-2.125 = 2.34e-3.
  expect_rel(p.batch_tokens, 1.06e5);
  expect_rel(p.learning_rate, 2.34e-3);
  EXPECT_THROW(plan_for_compute(0), Error);
  EXPECT_THROW(plan_for_compute(-1e17), Error);
  EXPECT_THROW(plan_for_model(1e17, 0), Error);
}

TEST(ScalingLaw, FlopsPerToken) {
  // 6 * 1e6 + 12 * 4 layers * 256 * 512 = 6e6 + 6'291'456.
  EXPECT_EQ(flops_per_token(1'000'000, 4, 256, 512), 12'291'456);
  EXPECT_EQ(flops_per_token(0, 0, 0, 0), 0);
  // Dense form: 72 * 2 * 64^2 + 12 * 2 * 64 * 128 = 589'824 + 196'608.
  EXPECT_EQ(dense_flops_per_token(2, 64, 128), 786'432);
  // DeepSeek LLM 7B-like: 30 layers, d 4096, seq 4096: 72*30*4096^2 + 12*30*4096*4096.
  EXPECT_EQ(dense_flops_per_token(30, 4096, 4096), 36'238'786'560 + 6'039'797'760);
  EXPECT_THROW(flops_per_token(-1, 1, 1, 1), Error);
  EXPECT_THROW(flops_per_token(int64_t(1) << 62, 1, 1, 1), Error);  // 6N overflows
}

TEST(LrSchedule, MultiStepBoundariesAreExact) {
  const double peak = 1e-3;
  // Warmup of 10 steps: step 0 already trains, step 9 reaches the peak.
  EXPECT_DOUBLE_EQ(lr_at(0, 1000, peak, 10, Schedule::MultiStep), 1e-4);
  EXPECT_DOUBLE_EQ(lr_at(4, 1000, peak, 10, Schedule::MultiStep), 5e-4);
  EXPECT_DOUBLE_EQ(lr_at(9, 1000, peak, 10, Schedule::MultiStep), peak);
  EXPECT_DOUBLE_EQ(lr_at(10, 1000, peak, 10, Schedule::MultiStep), peak);
  EXPECT_DOUBLE_EQ(lr_at(799, 1000, peak, 10, Schedule::MultiStep), peak);
  EXPECT_DOUBLE_EQ(lr_at(800, 1000, peak, 10, Schedule::MultiStep), 0.316 * peak);
  EXPECT_DOUBLE_EQ(lr_at(899, 1000, peak, 10, Schedule::MultiStep), 0.316 * peak);
  EXPECT_DOUBLE_EQ(lr_at(900, 1000, peak, 10, Schedule::MultiStep), 0.1 * peak);
  EXPECT_DOUBLE_EQ(lr_at(999, 1000, peak, 10, Schedule::MultiStep), 0.1 * peak);
  EXPECT_DOUBLE_EQ(lr_at(5000, 1000, peak, 10, Schedule::MultiStep), 0.1 * peak);
  // 7 steps: 0.8 * 7 = 5.6 and 0.9 * 7 = 6.3, so step 5 is still at peak, step 6 at 31.6%.
  EXPECT_DOUBLE_EQ(lr_at(5, 7, 1.0, 0, Schedule::MultiStep), 1.0);
  EXPECT_DOUBLE_EQ(lr_at(6, 7, 1.0, 0, Schedule::MultiStep), 0.316);
}

TEST(LrSchedule, CosineAndConstant) {
  const double peak = 2.0;
  EXPECT_DOUBLE_EQ(lr_at(0, 101, peak, 0, Schedule::Cosine), peak);
  // Halfway through the decay: 0.1 + 0.45 * (1 + cos(pi/2)) = 0.55 of peak.
  EXPECT_NEAR(lr_at(50, 101, peak, 0, Schedule::Cosine), 0.55 * peak, 1e-12);
  EXPECT_NEAR(lr_at(100, 101, peak, 0, Schedule::Cosine), 0.1 * peak, 1e-12);
  EXPECT_NEAR(lr_at(500, 101, peak, 0, Schedule::Cosine), 0.1 * peak, 1e-12);
  // With warmup 10 of 111 steps, decay spans steps 10..110.
  EXPECT_DOUBLE_EQ(lr_at(4, 111, peak, 10, Schedule::Cosine), 1.0);
  EXPECT_DOUBLE_EQ(lr_at(10, 111, peak, 10, Schedule::Cosine), peak);
  EXPECT_NEAR(lr_at(60, 111, peak, 10, Schedule::Cosine), 0.55 * peak, 1e-12);
  EXPECT_DOUBLE_EQ(lr_at(3, 100, peak, 4, Schedule::Constant), peak);
  EXPECT_DOUBLE_EQ(lr_at(1, 100, peak, 4, Schedule::Constant), 1.0);
  EXPECT_DOUBLE_EQ(lr_at(99, 100, peak, 4, Schedule::Constant), peak);
  EXPECT_THROW(lr_at(0, 0, peak, 0, Schedule::Constant), Error);
  EXPECT_THROW(lr_at(-1, 10, peak, 0, Schedule::Constant), Error);
  EXPECT_THROW(lr_at(0, 10, peak, -1, Schedule::Constant), Error);
  EXPECT_EQ(schedule_from_name("cosine"), Schedule::Cosine);
  EXPECT_EQ(schedule_from_name("multistep"), Schedule::MultiStep);
  EXPECT_THROW(schedule_from_name("linear"), Error);
}

TEST(PlanCommand, JsonAndTextOutput) {
  auto r = test::run_moekit_merged("plan --compute 1e20 --json");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  expect_rel(j["batch_tokens"].get<double>(), 1.02e6);
  expect_rel(j["learning_rate"].get<double>(), 9.86e-4);
  expect_rel(j["model_flops_per_token"].get<double>(), 5.25e9);
  expect_rel(j["tokens"].get<double>(), 1.90e10);
  EXPECT_FALSE(j["model_fixed"].get<bool>());

  r = test::run_moekit_merged("plan --compute 1e17 --model-flops-per-token 2e8");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("data D                 5e+08 tokens (C / M)"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("check M * D / C        1.0000"), std::string::npos) << r.output;

  r = test::run_moekit_merged("plan --compute -5");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.output.find("compute must be a positive number"), std::string::npos) << r.output;
}

}  // namespace moekit
