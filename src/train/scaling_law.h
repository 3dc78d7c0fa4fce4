// DeepSeek LLM's compute-optimal scaling laws, the FLOPs-per-token model scale they are stated in,
// and the learning-rate schedules the trainer steps through (docs: README "Planning with scaling
// laws"; formulas: shared/specs/methods.md, "DeepSeek LLM: scaling laws and alignment").
//
// The paper measures model scale M as non-embedding FLOPs per token *including attention*, not as
// a parameter count, so that C = M * D holds for the compute C of a run over D tokens. For MoE only
// the activated parameters (shared + top-K routed experts + attention + router) count.
#pragma once

#include <cstdint>
#include <string_view>

namespace moekit {

// Compute-optimal settings for a budget of `compute` FLOPs.
struct ScalingPlan {
  double compute = 0;                // C, FLOPs
  double batch_tokens = 0;           // B_opt = 0.2920 * C^0.3271, tokens per optimizer step
  double learning_rate = 0;          // eta_opt = 0.3118 * C^-0.1250, peak LR
  double model_flops_per_token = 0;  // M: M_opt = 0.1715 * C^0.5243, or the fixed model's M
  double tokens = 0;                 // D: D_opt = 5.8316 * C^0.4757, or C / M for a fixed model
  bool model_fixed = false;          // true when M was given and D derived from it
  // M * D / C: about 1.0001 for the fitted laws (0.1715 * 5.8316), exactly 1 for a fixed model.
  double allocation_check() const { return model_flops_per_token * tokens / compute; }
};

// All four quantities from the fitted power laws. Fails unless compute is finite and > 0.
ScalingPlan plan_for_compute(double compute);
// For a given model: B and eta still follow C, the token budget is D = C / M.
ScalingPlan plan_for_model(double compute, double model_flops_per_token);

// M for a (MoE or dense) model: 6 * N_active + 12 * n_layer * d_attn * seq_len.
// 6N is forward + backward of every activated non-embedding weight (2 FLOPs per multiply-add
// forward, 4 backward); 12 * n_layer * d_attn * seq_len is the attention score and value products
// (Q.K^T and P.V: forward + backward) that a parameter count misses. d_attn = n_heads * head_dim
// of the attention products (for MLA: heads * qk head dim). Fails on negative inputs or overflow.
int64_t flops_per_token(int64_t activated_nonembedding_params, int64_t n_layer, int64_t d_attn,
                        int64_t seq_len);
// The paper's dense-transformer form M = 72 * n_layer * d_model^2 + 12 * n_layer * d_model *
// seq_len, i.e. flops_per_token with the 12 * d_model^2 weights per layer of a standard block.
int64_t dense_flops_per_token(int64_t n_layer, int64_t d_model, int64_t seq_len);

enum class Schedule {
  MultiStep,  // DeepSeek LLM: peak until 80% of steps, 31.6% of peak until 90%, then 10%
  Cosine,     // cosine from peak (end of warmup) down to 10% of peak at the last step
  Constant,   // peak after warmup
};

// Learning rate for 0-based `step` of `total_steps`. Warmup is linear and reaches the peak on its
// last step: lr = peak * (step + 1) / warmup_steps for step < warmup_steps (so step 0 is never a
// wasted zero-LR step). MultiStep phases switch exactly at step = 0.8 * total and 0.9 * total
// (integer comparison, no rounding drift). Steps past the end keep the final value.
// Fails on total_steps < 1, warmup_steps < 0, step < 0 or a negative/non-finite peak.
double lr_at(int64_t step, int64_t total_steps, double peak_lr, int64_t warmup_steps,
             Schedule schedule);

// "multistep" | "cosine" | "constant"; fails naming the valid values otherwise.
Schedule schedule_from_name(std::string_view name);

}  // namespace moekit
