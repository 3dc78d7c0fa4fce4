// DeepSeek LLM scaling laws, FLOPs-per-token model scale and learning-rate schedules.
#include "train/scaling_law.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"

namespace moekit {

namespace {

void check_compute(double compute) {
  if (!std::isfinite(compute) || compute <= 0)
    fail("compute must be a positive number of FLOPs, got {}", compute);
}

// a * b with an overflow check: a silent wrap would turn a huge model into a tiny budget.
int64_t mul_checked(int64_t a, int64_t b) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) fail("flops_per_token: result overflows int64");
  return r;
}

}  // namespace

ScalingPlan plan_for_compute(double compute) {
  check_compute(compute);
  ScalingPlan p;
  p.compute = compute;
  p.batch_tokens = 0.2920 * std::pow(compute, 0.3271);
  p.learning_rate = 0.3118 * std::pow(compute, -0.1250);
  p.model_flops_per_token = 0.1715 * std::pow(compute, 0.5243);
  p.tokens = 5.8316 * std::pow(compute, 0.4757);
  return p;
}

ScalingPlan plan_for_model(double compute, double model_flops_per_token) {
  ScalingPlan p = plan_for_compute(compute);
  if (!std::isfinite(model_flops_per_token) || model_flops_per_token <= 0)
    fail("model FLOPs per token must be positive, got {}", model_flops_per_token);
  p.model_flops_per_token = model_flops_per_token;
  p.tokens = compute / model_flops_per_token;
  p.model_fixed = true;
  return p;
}

int64_t flops_per_token(int64_t activated_nonembedding_params, int64_t n_layer, int64_t d_attn,
                        int64_t seq_len) {
  if (activated_nonembedding_params < 0 || n_layer < 0 || d_attn < 0 || seq_len < 0)
    fail("flops_per_token: negative input (params {}, n_layer {}, d_attn {}, seq_len {})",
         activated_nonembedding_params, n_layer, d_attn, seq_len);
  const int64_t weights = mul_checked(6, activated_nonembedding_params);
  const int64_t attention = mul_checked(mul_checked(mul_checked(12, n_layer), d_attn), seq_len);
  int64_t total = 0;
  if (__builtin_add_overflow(weights, attention, &total))
    fail("flops_per_token: result overflows int64");
  return total;
}

int64_t dense_flops_per_token(int64_t n_layer, int64_t d_model, int64_t seq_len) {
  // 12 * d_model^2 weights per block: 4 d^2 in Q, K, V, O and 8 d^2 in a 4x-wide MLP.
  const int64_t params = mul_checked(mul_checked(12, n_layer), mul_checked(d_model, d_model));
  return flops_per_token(params, n_layer, d_model, seq_len);
}

double lr_at(int64_t step, int64_t total_steps, double peak_lr, int64_t warmup_steps,
             Schedule schedule) {
  if (total_steps < 1) fail("lr schedule: total steps must be >= 1, got {}", total_steps);
  if (warmup_steps < 0) fail("lr schedule: warmup steps must be >= 0, got {}", warmup_steps);
  if (step < 0) fail("lr schedule: step must be >= 0, got {}", step);
  if (!std::isfinite(peak_lr) || peak_lr < 0)
    fail("lr schedule: peak learning rate must be >= 0, got {}", peak_lr);
  if (step < warmup_steps) return peak_lr * double(step + 1) / double(warmup_steps);
  switch (schedule) {
    case Schedule::Constant:
      return peak_lr;
    case Schedule::MultiStep:
      // step / total < 0.8 written as 10 * step < 8 * total: exact for every integer step.
      if (10 * step < 8 * total_steps) return peak_lr;
      if (10 * step < 9 * total_steps) return 0.316 * peak_lr;
      return 0.1 * peak_lr;
    case Schedule::Cosine: {
      // Decays over the steps after warmup; the last step (total - 1) lands on 10% of peak.
      const int64_t span = total_steps - 1 - warmup_steps;
      const double t = span <= 0 ? 1.0 : std::min(1.0, double(step - warmup_steps) / double(span));
      return peak_lr * (0.1 + 0.45 * (1.0 + std::cos(std::numbers::pi * t)));
    }
  }
  fail("lr schedule: unknown schedule {}", int(schedule));
}

Schedule schedule_from_name(std::string_view name) {
  if (name == "multistep") return Schedule::MultiStep;
  if (name == "cosine") return Schedule::Cosine;
  if (name == "constant") return Schedule::Constant;
  fail("unknown schedule \"{}\" (expected multistep, cosine or constant)", name);
}

}  // namespace moekit
