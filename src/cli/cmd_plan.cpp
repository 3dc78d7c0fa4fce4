// `moekit plan`: compute-optimal batch size, learning rate, model scale and token budget for a
// FLOPs budget, from DeepSeek LLM's fitted scaling laws (train/scaling_law.h).
#include <fmt/format.h>

#include <memory>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "train/scaling_law.h"

namespace moekit::cli {

namespace {

struct PlanArgs {
  double compute = 0;
  double model_flops_per_token = 0;  // 0: use M_opt
  bool json = false;
};

void print_plan(const ScalingPlan& p) {
  fmt::print("compute C              {:.4g} FLOPs\n", p.compute);
  fmt::print("batch size B_opt       {:.4g} tokens per step\n", p.batch_tokens);
  fmt::print("learning rate eta_opt  {:.4g} (peak)\n", p.learning_rate);
  fmt::print("model scale M          {:.4g} non-embedding FLOPs per token{}\n",
             p.model_flops_per_token, p.model_fixed ? " (given)" : " (M_opt)");
  fmt::print("data D                 {:.4g} tokens{}\n", p.tokens,
             p.model_fixed ? " (C / M)" : " (D_opt)");
  fmt::print("check M * D / C        {:.4f}\n", p.allocation_check());
  if (p.model_fixed) {
    const ScalingPlan opt = plan_for_compute(p.compute);
    fmt::print("compute-optimal M      {:.4g} FLOPs per token (given M is {:.3g}x that)\n",
               opt.model_flops_per_token, p.model_flops_per_token / opt.model_flops_per_token);
  }
  // The laws were fitted on runs of 1e17 FLOPs and more; tiny CPU runs are far outside that.
  if (p.compute < 1e17)
    fmt::print("note: C is below the paper's fitting range (>= 1e17 FLOPs): an extrapolation\n");
}

}  // namespace

void add_plan_commands(CLI::App& app) {
  auto a = std::make_shared<PlanArgs>();
  auto* cmd = app.add_subcommand(
      "plan", "Compute-optimal batch size, learning rate, model scale and data for a budget");
  cmd->add_option("--compute", a->compute, "compute budget C in FLOPs (e.g. 1e17)")->required();
  cmd->add_option("--model-flops-per-token", a->model_flops_per_token,
                  "fixed model scale M (non-embedding FLOPs per token); derives D = C / M");
  cmd->add_flag("--json", a->json, "print one JSON object instead of a table");
  cmd->callback([a] {
    const ScalingPlan p = a->model_flops_per_token > 0
                              ? plan_for_model(a->compute, a->model_flops_per_token)
                              : plan_for_compute(a->compute);
    if (!a->json) {
      print_plan(p);
      return;
    }
    const nlohmann::json j = {{"compute", p.compute},
                              {"batch_tokens", p.batch_tokens},
                              {"learning_rate", p.learning_rate},
                              {"model_flops_per_token", p.model_flops_per_token},
                              {"tokens", p.tokens},
                              {"model_fixed", p.model_fixed},
                              {"m_times_d_over_c", p.allocation_check()}};
    fmt::print("{}\n", j.dump());
  });
}

}  // namespace moekit::cli
